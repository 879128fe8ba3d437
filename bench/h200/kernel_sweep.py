"""ONNX Runtime's CUDA kernel choices, A/B on one bundle: `python bench/h200/kernel_sweep.py BUNDLE --json OUT`.

Each variant is the runtime's defaults (omniedge/runtime/ort_cuda.py) plus some ONNX Runtime environment
variables or session config entries (OMNIEDGE_ORT_CONFIG), measured by `omniedge.bench.thinker_probe` in its
own process (fresh GPU): decode p50 and TTFT at each context, GPU memory growth against weights + KV, and
whether its greedy tokens on the same prompt equal the first variant's (on random weights a float16
near-tie can flip one; the count says how far they agree). The defaults in ort_cuda.py come from this table.

Processes differ by a few percent from one to the next on the same settings; `--rounds N` runs the whole list N
times, interleaved (A B C A B C ...), and ends with each variant's decode p50 per round, their median, and its
ratio to the first variant within each round (paired: a round's drift cancels), so a difference can be told
from that spread. `OMNIEDGE_CUDA_OPTIONS` in a variant sets CUDA provider options (e.g. `sdpa_kernel=1`); `@bundle` runs
the variant on another bundle (a graph variant over the same weights, bench/h200/graph_variant.py), e.g.
`--combine "fused q/k norm=@bundle=/root/work/full-bundle-fusedqk"`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.bench.thinker_probe import run_child

VARIANTS: dict[str, dict[str, str]] = {
    "runtime defaults": {},
    "initializers in one block (ORT default)": {
        "OMNIEDGE_ORT_CONFIG": "session.use_device_allocator_for_initializers=0"
    },
    "MatMulNBits fpA_intB GEMM + GEMV": {"ORT_FPA_INTB_GEMM": "1"},
    "MatMulNBits fpA_intB GEMM only": {"ORT_FPA_INTB_GEMM": "4"},
    "XQA decode attention on": {"ORT_ENABLE_XQA": "1"},
    "XQA decode attention off": {"ORT_ENABLE_XQA": "0"},
    "flash decode off": {"ORT_DISABLE_FLASH_DECODE": "1"},
    "cuDNN flash attention on": {"ORT_ENABLE_CUDNN_FLASH_ATTENTION": "1"},
    "cuDNN flash attention off": {"ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"},
    "QMoE GEMV off": {"ORT_DISABLE_MOE_GEMV": "1"},
    "MoE GEMV fused finalize on (onnxruntime's default)": {"ORT_DISABLE_MOE_GEMV_FUSED_FINALIZE": "0"},
    "small-N GEMV (the router)": {"ORT_ENABLE_SMALL_N_GEMV": "1"},
    "cuBLAS GEMM auto-tune (timed in graph replay)": {
        "ORT_CUDA_GEMM_AUTO_TUNE": "1",
        "ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING": "1",
    },
    "attention: ONNX Runtime flash, not cuDNN (sdpa_kernel=1)": {"OMNIEDGE_CUDA_OPTIONS": "sdpa_kernel=1"},
    "whole prompts (no fixed lengths)": {"--prefill-buckets": "none"},
    "prompts in 512-token pieces": {"--prefill-chunk": "512", "--prefill-buckets": "none"},
    "prompts in 1024-token pieces": {"--prefill-chunk": "1024", "--prefill-buckets": "none"},
}


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--providers", default="cuda")
    p.add_argument("--only", nargs="*", help="variant names (default: all)")
    p.add_argument("--combine", action="append", default=[], help="extra variant: NAME=ENV=V,ENV=V")
    p.add_argument("--rounds", type=int, default=1, help="run the variant list this many times, interleaved")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items() if not a.only or k in a.only}
    for spec in a.combine:
        name, _, pairs = spec.partition("=")
        variants[name] = dict(kv.split("=", 1) for kv in pairs.split(",") if kv)
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    ref: dict[int, list[int]] = {}
    for rnd, (name, env) in ((r, v) for r in range(a.rounds) for v in variants.items()):
        extra = [a for k, v in env.items() if k.startswith("--") for a in (k, v) if a]
        r = run_child(
            Path(env.get("@bundle", a.bundle)),
            a.providers,
            a.contexts,
            a.new_tokens,
            a.runs,
            env={k: v for k, v in env.items() if not k.startswith(("--", "@"))},
            extra=extra,
        )
        row: dict[str, Any] = {"variant": name, "round": rnd, "env": env, **r}
        for c in r.get("contexts", []):
            toks = c.get("last_run_tokens", [])
            ref.setdefault(c["context"], toks)
            c["tokens_equal_to_first_variant"] = agree(ref[c["context"]], toks)
        rows.append(row)
        line = [f"{name} (round {rnd + 1})" if a.rounds > 1 else name]
        for c in r.get("contexts", []):
            line.append(
                f"ctx {c['context']}: p50 {c['token_ms'].get('p50') or 0:.3f} ms, TTFT {c['ttft_ms']['mean']:.1f} ms, "
                f"tokens equal {c['tokens_equal_to_first_variant']}/{len(c.get('last_run_tokens', []))}"
            )
        mem = r.get("memory") or {}
        if mem:
            line.append(
                f"GPU {mem['gpu_used_growth_mib']:.0f} MiB, overhead {mem['overhead_over_weights_plus_kv']:.1%}"
            )
        if "error" in r:
            lines = [x for x in r["error"].strip().splitlines() if "Error" in x] or r[
                "error"
            ].strip().splitlines()
            line.append("ERROR " + lines[-1][:300])
        print(" | ".join(line), flush=True)
        summary = paired_summary(rows, list(variants))
        a.json.write_text(
            json.dumps({"command": " ".join(sys.argv), "rows": rows, "summary": summary}, indent=1)
        )
    if a.rounds > 1:
        for s in summary:
            print(
                f"{s['variant']:<58} ctx {s['context']:>5}: p50 by round {s['p50_by_round']} median {s['p50_median']}"
                f" | vs {next(iter(variants))!r}: ratio median {s['ratio_median']} [{s['ratio_min']}, {s['ratio_max']}]"
            )


def paired_summary(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per variant and context: decode p50 of each round, their median, and the ratio to the first variant
    of the same round (median, min, max over the rounds both completed)."""
    p50: dict[tuple[str, int, int], float] = {}
    for row in rows:
        for c in row.get("contexts", []):
            v = c["token_ms"].get("p50")
            if v:
                p50[(row["variant"], c["context"], row["round"])] = float(v)
    out: list[dict[str, Any]] = []
    contexts = sorted({k[1] for k in p50})
    rounds = sorted({k[2] for k in p50})
    for name in names:
        for ctx in contexts:
            mine = [p50[(name, ctx, r)] for r in rounds if (name, ctx, r) in p50]
            if not mine:
                continue
            ratios = [
                p50[(name, ctx, r)] / p50[(names[0], ctx, r)]
                for r in rounds
                if (name, ctx, r) in p50 and (names[0], ctx, r) in p50
            ]
            out.append(
                {
                    "variant": name,
                    "context": ctx,
                    "p50_by_round": [round(x, 3) for x in mine],
                    "p50_median": round(float(np.median(mine)), 3),
                    "ratio_median": round(float(np.median(ratios)), 4) if ratios else None,
                    "ratio_min": round(min(ratios), 4) if ratios else None,
                    "ratio_max": round(max(ratios), 4) if ratios else None,
                }
            )
    return out


if __name__ == "__main__":
    main()
