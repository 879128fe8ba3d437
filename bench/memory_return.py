"""Does the thinker's memory go back after each run? ONNX Runtime's CPU arena on vs off, on omni-mini.

Each setting runs in its own child process, with malloc tuned as `omniedge serve` tunes it: the thinker
(ORT flavour, IO binding) with a KV cache of `--context` tokens, one warm-up prefill, then `--prefills`
prefills of distinct seeded lengths up to the context, each followed by 8 decode steps. Reported:
- the largest peak growth of one prefill, measured on a heap trimmed just before it (malloc_trim),
- what stays resident after all of them, before and after a trim (what a budget must keep counting),
- decode milliseconds per step (median of 200 steps after a 100-token prompt) and the prefills' time,
- the cost of one malloc_trim after a request (median) and of the scheduler's check around a decode
  step (`Scheduler.running` without a trim).

    python3 -m omniedge.bench.memory_return --json bench/results/2026-12-01-memory-return-cpu-omni-mini.json

Settings: arena on (ONNX Runtime's default), arena off (what `Omni.load` does under a memory budget),
arena off with ONNX Runtime's memory patterns off too (they are cached per input shape).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

SETTINGS = {
    "arena on": {"arena": True, "mem_pattern": True},
    "arena off": {"arena": False, "mem_pattern": True},
    "arena off, memory patterns off": {"arena": False, "mem_pattern": False},
}


def _median_s(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(bundle: Path, arena: bool, mem_pattern: bool, context: int, prefills: int) -> dict[str, Any]:
    """One setting, in this process (call it in a fresh one)."""
    from omniedge.runtime.memory import RssMeter, release_freed_memory, tune_malloc_for_serving

    tune_malloc_for_serving()
    import onnxruntime as ort

    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import make_thinker

    m = load_manifest(bundle)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = mem_pattern
    onnx = m.components["thinker"].onnx
    session = ort.InferenceSession(str(onnx), sess_options=opts, providers=["CPUExecutionProvider"])
    backend = SimpleNamespace(
        session=session, device="cpu", providers=["CPUExecutionProvider"], cuda_graph=False
    )
    thinker = make_thinker(m, backend, context)
    meter, rng, hidden = RssMeter(), np.random.default_rng(0), m.text.hidden_size

    def prefill(n: int) -> None:
        embeds = (rng.standard_normal((1, n, hidden)) * 0.02).astype(np.float32)
        thinker.prefill(embeds, np.broadcast_to(np.arange(n), (3, n)).copy(), None)

    def decode(n: int, start: int) -> None:
        for i in range(n):
            thinker.decode((rng.standard_normal(hidden) * 0.02).astype(np.float32), start + i)

    prefill(8)
    release_freed_memory()
    start = meter.current()
    peak_growth, t_prefill, trims = 0, 0.0, []
    lengths = np.random.default_rng(1).integers(16, context - 8, prefills)
    for n in lengths:
        t = time.perf_counter()
        release_freed_memory()  # after the last request's prefill and decode steps, as the scheduler trims
        trims.append(time.perf_counter() - t)
        before = meter.current()
        meter.reset_peak()
        t = time.perf_counter()
        prefill(int(n))
        t_prefill += time.perf_counter() - t
        peak_growth = max(peak_growth, meter.peak() - before)
        decode(8, int(n))
    untrimmed = meter.current() - start
    release_freed_memory()
    trimmed = meter.current() - start
    prefill(100)
    step_s = _median_s(lambda: decode(1, 100), 200)
    return {
        "largest_prefill_growth_mib": peak_growth / 2**20,
        "kept_after_runs_mib": untrimmed / 2**20,
        "kept_after_runs_and_a_trim_mib": trimmed / 2**20,
        "decode_ms_per_step": step_s * 1e3,
        "prefills_s": t_prefill,
        "malloc_trim_ms": float(np.median(trims)) * 1e3,
    }


def scheduler_check_ms(bundle: Path) -> float:
    """The scheduler's check and measurement around one decode step, without the step (median, ms)."""
    from omniedge.runtime.app import Omni

    with Omni.load(bundle, memory_budget="90%") as omni:
        s = omni.scheduler

        def check() -> None:
            with s.running("thinker", 1.0, trim=False):
                pass

        return _median_s(check, 1000) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", help="engine bundle (default: the built-in default model)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prefills", type=int, default=300)
    p.add_argument("--json", type=Path, help="where to write the report (and .md beside it)")
    p.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from omniedge.defaults import default_bundle

    bundle = Path(args.bundle) if args.bundle else default_bundle(subprocess=True)
    if args.child:
        print(
            json.dumps(measure(bundle, **SETTINGS[args.child], context=args.context, prefills=args.prefills))
        )
        return 0
    from omniedge import __version__
    from omniedge.bench.system import machine

    results = {}
    for name in SETTINGS:
        cmd = [sys.executable, "-m", "omniedge.bench.memory_return", str(bundle), "--child", name]
        cmd += ["--context", str(args.context), "--prefills", str(args.prefills)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    report = {
        "omniedge": __version__,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            shlex.quote(a) for a in ["python3", "-m", "omniedge.bench.memory_return", *(argv or sys.argv[1:])]
        ),
        "machine": machine(),
        "bundle": str(bundle),
        "context": args.context,
        "prefills": args.prefills,
        "settings": results,
        "scheduler_check_ms_per_step": scheduler_check_ms(bundle),
    }
    text = markdown(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(text)
    print(text)
    return 0


def markdown(r: dict[str, Any]) -> str:
    rows = [
        f"| {name} | {v['largest_prefill_growth_mib']:.1f} | {v['kept_after_runs_mib']:.1f} | "
        f"{v['kept_after_runs_and_a_trim_mib']:.1f} | {v['decode_ms_per_step']:.3f} | {v['prefills_s']:.2f} | "
        f"{v['malloc_trim_ms']:.2f} |"
        for name, v in r["settings"].items()
    ]
    return "\n".join(
        [
            f"# Does the thinker's memory go back after each run? omni-mini on {r['machine']['cpu']}",
            "",
            f"command: `{r['command']}`  ",
            f"when: {r['when']}, omniedge {r['omniedge']}, onnxruntime {r['machine']['onnxruntime']} (CPU provider), "
            f"{r['machine']['cores']} cores; KV cache {r['context']} tokens, {r['prefills']} prefills of distinct "
            "lengths, 8 decode steps after each; malloc tuned as `omniedge serve` tunes it",
            "",
            "| setting | largest prefill growth (MiB) | kept after the runs (MiB) | kept after the runs and a "
            "trim (MiB) | decode (ms/step) | prefills (s) | one malloc_trim after a request (ms) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"The scheduler's check and measurement around one decode step (no trim): "
            f"{r['scheduler_check_ms_per_step']:.3f} ms (median of 1000).",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
