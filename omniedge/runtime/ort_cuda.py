"""The ONNX Runtime settings every CUDA session of the runtime gets, each one measured on the H200.

ONNX Runtime's CUDA kernels read some choices from session config entries and others only from environment
variables (read when a session builds its kernels). The runtime sets both here, once, and never overrides
what the user set: an `ORT_*` variable already in the environment wins over our default, so a user can
always A/B a kernel choice without editing code. Session config entries with no environment variable are
set the same way through `OMNIEDGE_ORT_CONFIG="key=value;key=value"` (any ONNX Runtime session config key;
it wins over ours for the same key), and the CUDA provider's own options through
`OMNIEDGE_CUDA_OPTIONS="key=value;..."` (e.g. `sdpa_kernel=1`: attention kernels by bitmask; it wins over the
runtime's provider options). Evidence for each default: bench/h200/kernel_sweep.py and
its result file under bench/results/ (named in each entry).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omniedge.errors import OmniedgeError


@dataclass(frozen=True)
class Setting:
    """One choice: an ONNX Runtime session config key (or None: environment only), the environment
    variable that means the same, the value we use, and why."""

    config_key: str | None
    env: str | None
    value: str
    why: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "session.use_device_allocator_for_initializers",
        None,
        "1",
        "each weight its own device allocation: the raw expert weights QMoE re-lays out at load are freed "
        "instead of staying inside one block with every other weight",
    ),
    Setting(
        None,
        "ORT_ENABLE_XQA",
        "0",
        "decode attention through flash decoding instead of XQA: 3.42 -> 3.12 ms per token at 512 tokens "
        "and 3.46 -> 3.33 ms at 4096 on the H200 (30B thinker), greedy tokens equal "
        "(bench/results/2026-12-01-h200-decode-xqa-warmup.md)",
    ),
    Setting(
        None,
        "ORT_DISABLE_MOE_GEMV_FUSED_FINALIZE",
        "1",
        "QMoE's decode: the down-projection GEMV and the weighted sum of the experts as two kernels, not one "
        "fused kernel (10.3 us per layer, half the bandwidth of the fused gate/up GEMV): decode 3.6% faster at "
        "512 tokens and 4.3% at 4096 on the H200 (30B thinker; three interleaved rounds, faster in each), "
        "greedy tokens equal at 512 (bench/results/2026-12-01-h200-decode-rounds.md)",
    ),
)


CONFIG_ENV = "OMNIEDGE_ORT_CONFIG"
OPTIONS_ENV = "OMNIEDGE_CUDA_OPTIONS"
_EXAMPLE = {CONFIG_ENV: "session.some_key=1;ep.cuda.other_key=0", OPTIONS_ENV: "sdpa_kernel=1;other_option=0"}


def _entries(name: str, environ: Any = None) -> dict[str, str]:
    """The `key=value;...` entries of environment variable `name`; a malformed one is an error that shows
    the expected form."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in env.get(name, "").split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OmniedgeError(f"{name} has {item!r}, not key=value", f'set it as {name}="{_EXAMPLE[name]}"')
        out[key.strip()] = value.strip()
    return out


def user_config(environ: Any = None) -> dict[str, str]:
    """`OMNIEDGE_ORT_CONFIG`'s session config entries."""
    return _entries(CONFIG_ENV, environ)


def provider_options(ours: dict[str, str], environ: Any = None) -> dict[str, str]:
    """The CUDA provider options a session is made with: the runtime's (`ours`), then
    `OMNIEDGE_CUDA_OPTIONS`'s entries over them."""
    return {**ours, **_entries(OPTIONS_ENV, environ)}


def apply(opts: Any, environ: Any = None) -> dict[str, str]:
    """Put the settings on `opts` (an onnxruntime.SessionOptions) and into the environment for the
    env-only ones; skip any the user set. Returns what this session runs with."""
    env = os.environ if environ is None else environ
    mine = user_config(env)
    used: dict[str, str] = {}
    for key, value in mine.items():
        opts.add_session_config_entry(key, value)
        used[key] = value
    for s in SETTINGS:
        if s.env and s.env in env:  # the user's choice: config entries would override it, so set none
            used[s.env] = env[s.env]
            continue
        if s.config_key in mine:
            continue
        if s.config_key:
            opts.add_session_config_entry(s.config_key, s.value)
            used[s.config_key] = s.value
        elif s.env:
            env[s.env] = s.value
            used[s.env] = s.value
    return used
