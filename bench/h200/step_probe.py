"""Where a decode step's wall time goes besides the GPU's kernels:
`python bench/h200/step_probe.py BUNDLE OUT.json [PROVIDERS]` (PROVIDERS: cuda, the default; cpu to try it).

One process, the runtime's own settings (CUDA graph), a 512-token prompt prefilled, then the decode step timed
four ways, each `--steps` times (medians and p90 in microseconds):
- `step`: as `omniedge.bench.decode_depth` times it (embedding row, `OrtThinker.decode`, greedy token read);
- `pieces`: the same work split at each host call: the embedding row, the inputs' one copy to the device
  (omniedge/runtime/step_buffers.py), `run_with_iobinding`, `synchronize_outputs`, the token read
  (`copies_via`: how the inputs reach the graph); `before_step_buffers`: the way before, on scratch buffers: three
  `update_inplace` copies and `OrtValue.numpy()` for the token;
- `replay`: run + synchronize only, inputs unchanged (the host's fixed cost around a replay);
- `queued`: `--steps` replays launched back to back, one synchronize at the end: the device's own time per
  step, the gaps between its kernels included, no host wait between steps.
`prefill`: a prompt's prefill fed as the runtime feeds it now against the way before (float32 embeddings and
zero deepstack features converted and copied every piece).
step - queued is what the host adds per token; the kernel profile (thinker_report --profile) gives the
kernels' sum, so queued - kernel sum is the time between kernels inside the graph.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def stats(us: list[float]) -> dict[str, float]:
    a = np.asarray(us)
    return {"p50_us": round(float(np.median(a)), 2), "p90_us": round(float(np.percentile(a, 90)), 2)}


def prefill_host_share(th: Any, table: np.ndarray, ids: np.ndarray, dtype: str, repeats: int = 10) -> dict:
    """A prompt's prefill (ms, p50 of `repeats`) as the runtime now feeds it (embeddings in the graph's type, no
    image: the resident zero deepstack) against the way before (float32 embeddings and deepstack features
    converted and copied every piece; a 1e-30 feature keeps that path, changing no logit that matters)."""
    n = ids.size
    pos = np.broadcast_to(np.arange(n), (3, n))
    now = np.asarray(table[ids], dtype=dtype)[None]
    before = np.asarray(table[ids], np.float32)[None]
    deep = np.zeros((th.num_deepstack, 1, n, before.shape[-1]), np.float32)
    tiny = deep.copy()
    if tiny.size:
        tiny.reshape(-1)[0] = 1e-30
    out: dict[str, Any] = {"tokens": int(n)}
    for name, args in (("now", (now, pos, deep.astype(dtype))), ("before", (before, pos, tiny))):
        ms = []
        for _ in range(repeats):
            t = time.perf_counter()
            th.prefill(*args).greedy()
            ms.append((time.perf_counter() - t) * 1e3)
        out[f"{name}_ms_p50"] = round(float(np.median(ms)), 3)
    return out


def main(bundle: Path, out: Path, providers: str = "cuda", steps: int = 300, context: int = 512) -> None:
    from omniedge.runtime.backends import OrtBackend
    from omniedge.runtime.bundle_files import load_embed
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import make_thinker

    m = load_manifest(bundle)
    backend = OrtBackend("thinker", m.components["thinker"].onnx, providers=providers, cuda_graph=True)
    backend.load()
    th = make_thinker(m, backend, context + 3 * steps + 64)
    table = load_embed(m)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, table.shape[0], context)
    x = np.asarray(table[ids], np.float32)[None]
    deep = np.zeros((m.text.num_deepstack, 1, context, x.shape[-1]), np.float32)
    tok = th.prefill(x, np.broadcast_to(np.arange(context), (3, context)), deep).greedy()
    pos = context
    res: dict[str, Any] = {"bundle": str(bundle), "context": context, "steps": steps}

    step: list[float] = []
    for _ in range(steps):
        t = time.perf_counter()
        tok = th.decode(table[tok], pos).greedy()
        step.append((time.perf_counter() - t) * 1e6)
        pos += 1
    res["step"] = stats(step)

    parts: dict[str, list[float]] = {k: [] for k in ("row", "write", "launch", "synchronize", "token")}
    io, opts, sess = th._decode, th._decode_opts, th.session
    for _ in range(steps):
        t0 = time.perf_counter()
        row = table[tok]
        t1 = time.perf_counter()
        th.step_in.write(row, pos, th.cache_len)
        t2 = time.perf_counter()
        sess.run_with_iobinding(io, opts)
        t3 = time.perf_counter()
        io.synchronize_outputs()
        t4 = time.perf_counter()
        tok = th.tokens.read()
        t5 = time.perf_counter()
        th.cache_len += 1
        pos += 1
        for k, a, b in (
            ("row", t0, t1),
            ("write", t1, t2),
            ("launch", t2, t3),
            ("synchronize", t3, t4),
            ("token", t4, t5),
        ):
            parts[k].append((b - a) * 1e6)
    res["pieces"] = {k: stats(v) for k, v in parts.items()}
    res["copies_via"] = {"inputs": th.step_in.how, "token": "numpy"}

    # the way before step_buffers.py, on scratch buffers of the same shapes (not bound to the graph)
    ort = th._ort
    scratch = [
        ort.OrtValue.ortvalue_from_shape_and_type(shape, dt, th.device, 0)
        for shape, dt in (([1, 1, th.hidden], th.dtype), ([1, 1], np.int64), ([1], np.int32))
    ]
    old: dict[str, list[float]] = {"three_copies": [], "token_numpy": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        scratch[0].update_inplace(np.asarray(table[tok], dtype=th.dtype).reshape(1, 1, th.hidden))
        scratch[1].update_inplace(np.array([[pos]], np.int64))
        scratch[2].update_inplace(np.array([th.cache_len], np.int32))
        t1 = time.perf_counter()
        tok = int(th.next_buf.numpy().reshape(-1)[0])
        t2 = time.perf_counter()
        old["three_copies"].append((t1 - t0) * 1e6)
        old["token_numpy"].append((t2 - t1) * 1e6)
    res["before_step_buffers"] = {k: stats(v) for k, v in old.items()}

    replay: list[float] = []
    for _ in range(steps):  # inputs unchanged: the same cache slot is written again
        t = time.perf_counter()
        sess.run_with_iobinding(io, opts)
        io.synchronize_outputs()
        replay.append((time.perf_counter() - t) * 1e6)
    res["replay"] = stats(replay)

    queued: list[float] = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            sess.run_with_iobinding(io, opts)
        io.synchronize_outputs()
        queued.append((time.perf_counter() - t) * 1e6 / steps)
    res["queued"] = {
        "per_step_us_by_batch": [round(q, 2) for q in queued],
        "p50_us": round(float(np.median(queued)), 2),
    }
    res["host_added_us"] = round(res["step"]["p50_us"] - res["queued"]["p50_us"], 2)
    res["prefill"] = prefill_host_share(th, table, ids, m.thinker.input_dtype)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
