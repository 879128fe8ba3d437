"""Bytes per decode step, the bandwidth roofline, and a projection to Jetson AGX Orin.

The exporter counts what one decode step must read (manifest `thinker_graph.decode_cost`: dense weights
every token, the top-k experts of each MoE layer, the KV cache of the context so far). Decode is bound by
memory bandwidth, so the floor of a step is bytes / bandwidth; measured time over that floor is the gap.

Projection (labelled as such, never a measurement): the fraction of the H200's copy bandwidth the step
achieved is carried to Orin's 204.8 GB/s: t_orin = bytes / (204.8 GB/s x efficiency_h200). A second estimate
adds the measured per-kernel overhead (kernels x the H200's per-kernel time beyond its bytes) unchanged,
since small kernels cost about the same fixed time on both. Orin's compute side (FLOPs / dense FP16 rate)
is shown to confirm that decode stays memory-bound there.
"""

from __future__ import annotations

from typing import Any

ORIN = {
    "AGX Orin 64GB": {"bandwidth_gb_s": 204.8, "fp16_tflops": 42.5},
    "AGX Orin 32GB": {"bandwidth_gb_s": 204.8, "fp16_tflops": 42.5 * 0.63},
}
PROJECTION_METHOD = (
    "projection, not a measurement: t_orin = bytes per step / (204.8 GB/s x fraction of the bandwidth roofline "
    "reached on the H200); second estimate: Orin's bytes floor + the H200's measured time beyond its own floor "
    "(fixed per-kernel costs carried over unchanged)"
)
PUBLISHED = {
    "Edge-LLM Qwen3-30B-A3B INT4 on AGX Orin 64GB (measured by NVIDIA)": "56.7 tok/s",
    "reference article, INT4 Qwen3-Omni on AGX Orin (claimed)": "180 ms/token (5.6 tok/s)",
}


def step_bytes(cost: dict[str, Any], context: int) -> float:
    """Bytes one decode step reads at `context` tokens already cached."""
    return (
        float(cost["bytes_per_token_at_zero_context"]) + float(cost["kv_bytes_per_context_token"]) * context
    )


def step_flops(cost: dict[str, Any], context: int) -> float:
    return (
        float(cost["flops_per_token_at_zero_context"])
        + float(cost["attention_flops_per_context_token"]) * context
    )


def measure_copy_bandwidth(gib: float = 4.0, repeats: int = 20) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), or None without a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    bw = 2 * a.numel() * a.element_size() / times[len(times) // 2]
    del a, b
    torch.cuda.empty_cache()
    return bw


def roofline(
    cost: dict[str, Any], context: int, measured_ms: float | None, bandwidth: float | None
) -> dict[str, Any]:
    """Floor, measured time and the fraction of the floor reached, for one context."""
    nbytes = step_bytes(cost, context)
    out: dict[str, Any] = {
        "context": context,
        "bytes_per_token": nbytes,
        "flops_per_token": step_flops(cost, context),
    }
    if bandwidth:
        floor = nbytes / bandwidth * 1e3
        out["bandwidth_gb_s"] = bandwidth / 1e9
        out["floor_ms"] = floor
        if measured_ms:
            out["measured_ms"] = measured_ms
            out["fraction_of_roofline"] = floor / measured_ms
    return out


def orin_projection(cost: dict[str, Any], context: int, h200: dict[str, Any]) -> dict[str, Any]:
    """Projected AGX Orin decode speed from an H200 roofline entry (`roofline(...)` with a measured time)."""
    nbytes = step_bytes(cost, context)
    eff = h200.get("fraction_of_roofline")
    out: dict[str, Any] = {"context": context, "method": PROJECTION_METHOD}
    for name, spec in ORIN.items():
        bw = spec["bandwidth_gb_s"] * 1e9
        entry: dict[str, Any] = {
            "bytes_floor_ms": nbytes / bw * 1e3,
            "compute_floor_ms": step_flops(cost, context) / (spec["fp16_tflops"] * 1e12) * 1e3,
        }
        if eff:
            t = nbytes / (bw * eff) * 1e3
            entry["projected_ms"] = t
            entry["projected_tok_s"] = 1e3 / t
            if h200.get("measured_ms"):
                overhead = h200["measured_ms"] - h200["floor_ms"]  # what the H200 spent beyond its bytes
                t2 = entry["bytes_floor_ms"] + overhead
                entry["projected_ms_fixed_overhead"] = t2
                entry["projected_tok_s_fixed_overhead"] = 1e3 / t2
        out[name] = entry
    out["published_for_comparison"] = PUBLISHED
    return out
