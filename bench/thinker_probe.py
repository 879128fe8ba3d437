"""The thinker alone in a fresh process: decode and TTFT at given contexts, and the GPU memory it holds.

`python -m omniedge.bench.thinker_probe BUNDLE --contexts 512 4096 --json OUT` loads only the bundle's
thinker (no encoders), with the runtime's own settings (omniedge/runtime/ort_cuda.py; ONNX Runtime
environment variables and OMNIEDGE_ORT_CONFIG set by the caller apply), times it with `decode_at_depth`,
and reads the device's used memory (NVML) before the first CUDA call and after the longest context:
that growth is everything the thinker costs on the GPU (CUDA context, weights as the kernels lay them out,
KV cache, workspaces), compared with its weight bytes + KV bytes. A fresh process is what makes the
memory figure honest: nothing else has touched the GPU. thinker_report and kernel_sweep run it as a child.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def gpu_used_bytes() -> int | None:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # no NVML here: memory is reported as unknown, never guessed
        return None


def probe(
    bundle: Path,
    providers: str,
    contexts: list[int],
    new_tokens: int,
    runs: int,
    cuda_graph: bool = True,
    prefill_chunk: int | None = None,
    prefill_buckets: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    from omniedge.bench.decode_depth import decode_at_depth
    from omniedge.runtime.backends import OrtBackend
    from omniedge.runtime.bundle_files import load_embed
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import make_thinker

    used0 = gpu_used_bytes()
    m = load_manifest(bundle)
    comp = m.components["thinker"]
    backend = OrtBackend(
        "thinker", comp.onnx, providers=providers, cuda_graph=cuda_graph, custom_ops=m.thinker.custom_ops
    )
    t0 = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner = make_thinker(  # on CUDA: the warm-up
        m, backend, max(contexts) + new_tokens + 8, prefill_chunk, prefill_buckets=prefill_buckets
    )
    init_s = time.perf_counter() - t0
    used_loaded = gpu_used_bytes()
    table = load_embed(m)
    omni = SimpleNamespace(thinker=runner, embed_table=table, manifest=m)
    out: dict[str, Any] = {
        "bundle": str(bundle),
        "providers": backend.active_providers(),
        "cuda_graph": backend.cuda_graph,
        "settings": backend.cuda_settings,
        "prefill_chunk": prefill_chunk,
        "prefill_buckets": list(runner.prefill_buckets) if hasattr(runner, "prefill_buckets") else None,
        "load_s": load_s,
        "thinker_init_s": init_s,  # buffers, and on CUDA the warm-up prefill at the full context
        "contexts": [],
    }
    for c in sorted(contexts):
        out["contexts"].append(decode_at_depth(omni, c, new_tokens, runs))
    used1 = gpu_used_bytes()
    kv = int(runner.kv_bytes)
    weights = int(comp.weight_bytes)
    if used0 is not None and used1 is not None:
        out["memory"] = {
            "gpu_used_growth_mib": (used1 - used0) / 2**20,
            "after_load_mib": ((used_loaded or used0) - used0) / 2**20,
            "weights_mib": weights / 2**20,
            "kv_cache_mib": kv / 2**20,
            "kv_cache_tokens": runner.max_context,
            "overhead_over_weights_plus_kv": (used1 - used0) / (weights + kv) - 1,
        }
    return out


def run_child(
    bundle: Path,
    providers: str,
    contexts: list[int],
    new_tokens: int,
    runs: int,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """`probe` in a child process (fresh GPU state); its JSON, or {"error": ...} with the end of its log."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        dest = Path(d) / "probe.json"
        cmd = [sys.executable, "-m", "omniedge.bench.thinker_probe", str(bundle), "--providers", providers]
        cmd += ["--contexts", *map(str, contexts), "--new-tokens", str(new_tokens), "--runs", str(runs)]
        cmd += [*(extra or []), "--json", str(dest)]
        p = subprocess.run(
            cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        if p.returncode != 0 or not dest.is_file():
            return {"error": (p.stderr or p.stdout)[-2000:], "returncode": p.returncode}
        return json.loads(dest.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--providers", default="cuda")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--prefill-chunk", type=int, help="prompt pieces of this many tokens (default: whole)")
    p.add_argument(
        "--prefill-buckets",
        help="prompt piece lengths, comma-separated, or 'none' for whole prompts (default: the runtime's choice)",
    )
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    buckets = None
    if a.prefill_buckets:
        spec = a.prefill_buckets.replace("/", ",")  # "/" too: kernel_sweep splits its variants on ","
        buckets = () if spec == "none" else tuple(int(x) for x in spec.split(","))
    r = probe(
        a.bundle,
        a.providers,
        a.contexts,
        a.new_tokens,
        a.runs,
        not a.no_cuda_graph,
        a.prefill_chunk,
        buckets,
    )
    from omniedge.atomic import atomic_write_json

    atomic_write_json(a.json, r)


if __name__ == "__main__":
    main()
