"""First-prompt cost per length after the runtime's warm-up: which prompt lengths still pay kernel-tactic
profiling. `python3 bench/h200/bucket_probe.py BUNDLE OUT.json [lengths...]`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from omniedge.bench.prefill_memory import MIB, process_gpu_bytes
from omniedge.runtime.backends import OrtBackend
from omniedge.runtime.manifest import load_manifest
from omniedge.runtime.thinker_ort import make_thinker

bundle, dest = sys.argv[1], sys.argv[2]
lengths = [int(x) for x in sys.argv[3:]] or [2**i for i in range(13) if 2**i <= 4096] + [3, 100, 700, 3000]
m = load_manifest(bundle)
b = OrtBackend("thinker", m.components["thinker"].onnx, providers="cuda", cuda_graph=True)
b.load()
t0 = time.perf_counter()
r = make_thinker(m, b, 4168)
rows = {"warm_up_s": round(time.perf_counter() - t0, 1), "mem_mib": [], "runs": []}
for n in lengths:
    ms = []
    for _ in range(2):
        t0 = time.perf_counter()
        r.prefill(np.zeros((1, n, m.text.hidden_size), r.dtype), np.broadcast_to(np.arange(n), (3, n)), None)
        ms.append(round((time.perf_counter() - t0) * 1e3, 1))
    rows["runs"].append(
        {
            "tokens": n,
            "first_ms": ms[0],
            "second_ms": ms[1],
            "mem_mib": round((process_gpu_bytes() or 0) / MIB),
        }
    )
    print(rows["runs"][-1], flush=True)
Path(dest).write_text(json.dumps(rows, indent=1))
