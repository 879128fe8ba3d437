"""Arena shrink after the warm-up prefill, before the decode step is captured: what it frees, whether decode
still replays, and its greedy tokens against the default. `python3 bench/h200/shrink_probe.py BUNDLE OUT.json
[--chunk N]` (one variant per process: fresh GPU)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from omniedge.bench.prefill_memory import MIB, process_gpu_bytes
from omniedge.runtime.backends import OrtBackend
from omniedge.runtime.manifest import load_manifest
from omniedge.runtime.thinker_ort import make_thinker

p = argparse.ArgumentParser()
p.add_argument("bundle")
p.add_argument("json")
p.add_argument("--chunk", type=int)
p.add_argument("--shrink", action="store_true")
a = p.parse_args()
m = load_manifest(a.bundle)
start = process_gpu_bytes() or 0
b = OrtBackend("thinker", m.components["thinker"].onnx, providers="cuda", cuda_graph=True)
b.load()
ctx = 4168
r = make_thinker(m, b, ctx, prefill_chunk=a.chunk, warm_up=False)
ort = r._ort
mem = lambda: round(((process_gpu_bytes() or 0) - start) / MIB)  # noqa: E731
out = {"chunk": a.chunk, "shrink": a.shrink, "after_load": mem()}
if a.shrink:
    keep = r._prefill_opts
    r._prefill_opts = ort.RunOptions()
    r._prefill_opts.add_run_config_entry("gpu_graph_id", "-1")
    r._prefill_opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
t0 = time.perf_counter()
r.warm_up()
out["warm_up_s"] = round(time.perf_counter() - t0, 1)
out["after_warm_up"] = mem()
if a.shrink:
    r._prefill_opts = keep
table = np.load(m.embed_file, mmap_mode="r")
rng = np.random.default_rng(0)
out["runs"] = []
for n in (512, 4096, 1000, 3000, 512):
    ids = rng.integers(0, table.shape[0], n)
    t0 = time.perf_counter()
    s = r.prefill(np.asarray(table[ids], r.dtype)[None], np.broadcast_to(np.arange(n), (3, n)), None)
    ttft = (time.perf_counter() - t0) * 1e3
    toks = [s.greedy()]
    t0 = time.perf_counter()
    for i in range(32):
        s = r.decode(np.asarray(table[toks[-1]], r.dtype), n + i)
        toks.append(s.greedy())
    ms = (time.perf_counter() - t0) * 1e3 / 32
    out["runs"].append(
        {"tokens": n, "ttft_ms": round(ttft, 1), "decode_ms": round(ms, 3), "mem": mem(), "greedy": toks}
    )
    print(
        out["runs"][-1]["tokens"],
        out["runs"][-1]["ttft_ms"],
        out["runs"][-1]["decode_ms"],
        out["runs"][-1]["mem"],
        flush=True,
    )
w, kv = m.components["thinker"].weight_bytes / MIB, r.kv_bytes / MIB
out.update(weights_mib=round(w), kv_mib=round(kv), overhead=round(out["runs"][-1]["mem"] / (w + kv) - 1, 4))
print({k: v for k, v in out.items() if k != "runs"})
Path(a.json).write_text(json.dumps(out, indent=1))
