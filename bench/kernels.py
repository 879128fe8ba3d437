"""Where a decode step's time goes: ONNX Runtime's own profiler per op type, and the GPU's kernels.

ONNX Runtime's profiler (SessionOptions.enable_profiling) records each node's host-side duration; on the CPU
that is the op's time, on CUDA it is mostly the launch (kernels run asynchronously), so on a GPU the kernel
times come from CUPTI through torch.profiler, which sees every CUDA kernel of the process, ONNX Runtime's
included. Kernels are grouped into the graph's op families by name; each family's bytes per step (from the
exporter's count) over its kernel time give its effective bandwidth. The launch share is the step's wall
time not covered by any kernel.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

MOE_FAMILY = "MoE experts (QMoE or MoEInt4)"
# kernel-name patterns -> op family (first match wins); names differ across ONNX Runtime builds, so the
# unmatched ones are listed as they are
FAMILIES: list[tuple[str, str]] = [
    # ONNX Runtime's QMoE kernels, and omniedge's MoEInt4 (kernels/moe_int4/: anonymous-namespace names)
    (
        r"moe|expert|topk|permute|finalize|grouped|swiglu|down_weighted_sum|gate_up_gemm|down_gemm|route_count"
        r"|plan_tiles|namespace\)::scatter",
        MOE_FAMILY,
    ),
    (r"flash|xqa|attention|mha|gqa|rotary|concat.*kv|kvcache|copy_kv|unpack", "GroupQueryAttention"),
    (r"nbits|int4|4bit|dequant|blkq|matmulfloatint|gemv|fpa_intb", "MatMulNBits"),
    (r"layernorm|layer_norm|rmsnorm|skip", "Norms"),
    (r"argmax|reduce", "ArgMax"),
    (r"gemm|sgemm|hgemm|cutlass|cublas|ampere|sm90", "MatMul (router, float)"),
    (r"memcpy|memset", "Memcpy"),
]


def family(kernel: str) -> str:
    k = kernel.lower()
    for pattern, name in FAMILIES:
        if re.search(pattern, k):
            return name
    return "other"


def ort_profile_by_op(
    profile_json: str | Path, steps: int, skip_last: int = 0
) -> dict[str, dict[str, float]]:
    """ONNX Runtime profiler file -> {op type: {"ms_per_step", "nodes_per_step"}} over the last `steps` runs
    before the final `skip_last` ones (other runs, e.g. the prefill, are left out)."""
    events = json.loads(Path(profile_json).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    runs = runs[len(runs) - steps - skip_last : len(runs) - skip_last]
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in runs]
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if not any(a <= float(e.get("ts", 0)) <= b for a, b in spans):
            continue
        op = str(e.get("args", {}).get("op_name", "?"))
        total[op] += float(e.get("dur", 0)) / 1e3
        count[op] += 1
    return {
        op: {"ms_per_step": total[op] / steps, "nodes_per_step": count[op] / steps}
        for op in sorted(total, key=total.get, reverse=True)  # type: ignore[arg-type]
    }


def cuda_kernels(step: Callable[[], None], steps: int) -> dict[str, Any] | None:
    """Run `step` `steps` times under CUPTI; kernel time per family and the uncovered (launch) share."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    import time

    step()  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # type: ignore[arg-type,return-value]
    for evt in prof.key_averages():
        dev_us = float(getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0))
        if dev_us <= 0:
            continue
        by_name[evt.key][0] += dev_us / 1e3 / steps
        by_name[evt.key][1] += evt.count / steps
    fams: dict[str, dict[str, float]] = defaultdict(lambda: {"ms_per_step": 0.0, "kernels_per_step": 0.0})
    for name, (ms, n) in by_name.items():
        f = fams[family(name)]
        f["ms_per_step"] += ms
        f["kernels_per_step"] += n
    kernel_ms = sum(v[0] for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": kernel_ms,
        "kernels_per_step": sum(v[1] for v in by_name.values()),
        "uncovered_share": max(0.0, 1 - kernel_ms / wall_ms) if wall_ms else None,
        "families": dict(sorted(fams.items(), key=lambda kv: -kv[1]["ms_per_step"])),
        "top_kernels": [
            {"name": n[:160], "ms_per_step": v[0], "per_step": v[1], "family": family(n)} for n, v in top
        ],
    }


def family_bandwidth(
    families: dict[str, dict[str, float]], cost: dict[str, Any], context: int
) -> dict[str, Any]:
    """Bytes each family must read per step (exporter's count) over its kernel time."""
    kv = float(cost["kv_bytes_per_context_token"]) * context
    float_mm = float(cost.get("float_matmul_bytes", 0))  # absent in bundles exported before it was counted
    nbytes = {
        MOE_FAMILY: float(cost["expert_bytes_per_token"]),
        "GroupQueryAttention": kv,
        # INT4 dense weights (attention projections, an INT4 lm_head); norms are a rounding error here
        "MatMulNBits": float(cost["dense_bytes"]) - float_mm,
    }
    if float_mm:
        nbytes["MatMul (router, float)"] = float_mm  # routers and a float lm_head
    out = {}
    for fam, b in nbytes.items():
        ms = families.get(fam, {}).get("ms_per_step")
        out[fam] = {"bytes": b, "ms": ms, "gb_s": (b / (ms / 1e3) / 1e9) if ms else None}
    return out
