"""The thinker's decode speed on a GPU, explained: `python -m omniedge.bench.thinker_report BUNDLE ...`.

One run measures, on the same machine: omniedge's decode at each context (p50/p90/p99 over enough tokens,
run-to-run spread), time to first token for a prompt of that length, GPU memory against weights + KV
cache, the bandwidth roofline (bytes per step over the measured copy bandwidth), where the time goes (ONNX
Runtime's profiler per op type and the GPU's kernels per op family, each family's effective bandwidth,
the share of the step no kernel covers), transformers' own decode of the same model as the baseline (in a
child process), and a projection to Jetson AGX Orin. Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_bytes, atomic_write_json
from omniedge.bench.kernels import cuda_kernels, family_bandwidth, ort_profile_by_op
from omniedge.bench.roofline import measure_copy_bandwidth, orin_projection, roofline
from omniedge.bench.system import machine
from omniedge.bench.thinker_probe import run_child


def _profile(
    bundle: Path, providers: str, context: int, steps: int, out_dir: Path, cost: dict
) -> dict[str, Any]:
    """A second thinker session without CUDA graphs, ONNX Runtime's profiler on, `steps` decode steps."""
    import numpy as np

    from omniedge.runtime.backends import OrtBackend
    from omniedge.runtime.bundle_files import load_embed
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import make_thinker

    m = load_manifest(bundle)
    backend = OrtBackend(
        "thinker",
        m.components["thinker"].onnx,
        providers=providers,
        profile_prefix=str(out_dir / "ort_profile"),
        custom_ops=m.thinker.custom_ops,
    )
    runner = make_thinker(m, backend, max_context=context + steps + 8)
    table = load_embed(m)
    h = m.text.hidden_size
    prompt = np.asarray(table[np.arange(context) % table.shape[0]], np.float32)[None]
    positions = np.broadcast_to(np.arange(context), (3, context))
    deep = np.zeros((m.text.num_deepstack, 1, context, h), np.float32)

    def prefill() -> None:
        runner.prefill(prompt, positions, deep).greedy()

    prefill_runs = 3
    prefill_kernels = cuda_kernels(prefill, prefill_runs)  # leaves the cache at `context` tokens
    state = {"n": 0}

    def step() -> None:
        runner.decode(table[7], runner.cache_len).greedy()
        state["n"] += 1

    kernels = cuda_kernels(step, steps)
    n_ort = state["n"]
    prof = backend.end_profiling()
    out: dict[str, Any] = {"context": context}
    if prof:
        out["ort_ops"] = ort_profile_by_op(prof, max(1, n_ort))
        out["ort_ops_note"] = (
            "host-side node durations; on CUDA mostly launch time (kernels are asynchronous)"
        )
        out["prefill_ort_ops"] = ort_profile_by_op(prof, prefill_runs, skip_last=n_ort)
    if kernels:
        out["kernels"] = kernels
        out["family_bandwidth"] = family_bandwidth(kernels["families"], cost, context)
    if prefill_kernels:
        out["prefill_kernels"] = prefill_kernels  # one prefill of `context` tokens, per kernel family
    backend.unload()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from omniedge.runtime.manifest import load_manifest

    bundle = Path(args.bundle)
    report: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            shlex.quote(a) for a in [sys.executable, "-m", "omniedge.bench.thinker_report", *sys.argv[1:]]
        ),
        "machine": machine(),
        "bundle": str(bundle),
    }
    m = load_manifest(bundle)
    cost = m.raw["thinker_graph"].get("decode_cost") or {}
    report["decode_cost"] = cost
    # decode, TTFT and GPU memory: the thinker alone in a fresh process (thinker_probe), so the memory growth
    # is the thinker's and nothing else's
    extra = ["--no-cuda-graph"] if args.no_cuda_graph else []
    probe = run_child(bundle, args.providers, args.contexts, args.new_tokens, args.runs, extra=extra)
    if "error" in probe:
        raise RuntimeError(f"the thinker probe failed: {probe['error']}")
    bw = measure_copy_bandwidth()
    report["copy_bandwidth_gb_s"] = bw / 1e9 if bw else None
    report["load_s"] = probe["load_s"]
    report["thinker_providers"] = probe["providers"]
    report["cuda_graph"] = probe["cuda_graph"]
    report["ort_settings"] = probe["settings"]
    report["contexts"] = []
    for r in probe["contexts"]:
        c, p50 = r["context"], r["token_ms"].get("p50")
        r["roofline"] = roofline(cost, c, p50, bw) if cost else None
        if r["roofline"] and r["roofline"].get("fraction_of_roofline"):
            r["orin_projection"] = orin_projection(cost, c, r["roofline"])
        report["contexts"].append(r)
        print(
            f"context {c}: token p50 {p50 or 0:.3f} ms, ttft {r['ttft_ms']['mean']:.1f} ms "
            f"(first request {r.get('ttft_first_request_ms', 0):.1f} ms)",
            flush=True,
        )
    report["memory"] = probe.get("memory")
    if args.profile and cost:
        out_dir = Path(args.json).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        report["profile"] = _profile(
            bundle, args.providers, args.contexts[0], args.profile_steps, out_dir, cost
        )
    if args.baseline:
        from omniedge.bench.baseline_hf import run_baseline_subprocess

        base_args = [
            args.baseline,
            "--contexts",
            *map(str, args.contexts),
            "--new-tokens",
            str(args.baseline_tokens),
        ]
        base_args += ["--runs", "2", "--device", args.baseline_device, "--dtype", args.baseline_dtype]
        if args.baseline_random:
            base_args.append("--random-weights")
        if args.baseline_experts:
            base_args += ["--experts", args.baseline_experts]
        try:
            report["baseline"] = run_baseline_subprocess(base_args)
        except RuntimeError as e:
            report["baseline"] = {"error": str(e)[-1500:]}
    return report


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# thinker decode: {r['bundle']}",
        "",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine'].get('gpu') or r['machine'].get('cpu')}, providers {r.get('thinker_providers')}, "
        f"CUDA graph {r.get('cuda_graph')}, copy bandwidth {r.get('copy_bandwidth_gb_s') or 0:.0f} GB/s",
        "",
        "| context | decode p50 / p90 / p99 ms | tok/s | TTFT ms | first request's TTFT ms | run spread "
        "| roofline ms | of roofline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["contexts"]:
        t, rf = c["token_ms"], c.get("roofline") or {}
        pct = f"{rf['fraction_of_roofline'] * 100:.0f}%" if rf.get("fraction_of_roofline") else "-"
        pct_ms = " / ".join(f"{t[k]:.3f}" if t.get(k) is not None else "-" for k in ("p50", "p90", "p99"))
        lines.append(
            f"| {c['context']} | {pct_ms} "
            f"| {c['decode_tok_s']:.0f} | {c['ttft_ms']['mean']:.1f} | {c.get('ttft_first_request_ms', 0):.1f} "
            f"| {c['spread'].get('relative_range', 0):.1%} "
            f"| {rf.get('floor_ms', 0):.3f} | {pct} |"
        )
    b = r.get("baseline") or {}
    for c in b.get("contexts", []):
        lines.append(
            f"| {c['context']} (transformers {b['dtype']}, {b['experts_implementation']}) | "
            f"{c['token_ms'].get('p50', 0):.2f} | {1e3 / c['token_ms']['p50']:.1f} | {c['ttft_ms']['mean']:.1f} | | "
            f"{c['spread'].get('relative_range', 0):.1%} | | |"
        )
    mem = r.get("memory") or {}
    if mem.get("gpu_used_delta_mib") is not None:
        lines += [
            "",
            f"GPU memory: {mem['gpu_used_delta_mib']:.0f} MiB used for weights {mem['weights_mib']:.0f} MiB + KV "
            f"{mem['kv_cache_mib']:.0f} MiB ({mem['kv_cache_tokens']} tokens): overhead "
            f"{mem['overhead_over_weights_plus_kv']:.1%}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--providers", default="cuda")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--baseline", help="checkpoint for transformers' decode (same model)")
    p.add_argument(
        "--baseline-random", action="store_true", help="its config with random weights on the device"
    )
    p.add_argument("--baseline-device", default="cuda")
    p.add_argument("--baseline-dtype", default="bfloat16")
    p.add_argument("--baseline-experts", help="eager, batched_mm or grouped_mm")
    p.add_argument("--baseline-tokens", type=int, default=32)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    report = run(args)
    atomic_write_json(Path(args.json), report)
    md = markdown(report)
    atomic_write_bytes(Path(args.json).with_suffix(".md"), md.encode())
    print(md)


if __name__ == "__main__":
    main()
