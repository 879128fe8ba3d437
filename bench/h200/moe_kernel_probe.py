"""The fused INT4 MoE decode kernels (kernels/moe_int4/) on a GPU: exact against a float32 reference first,
then timed at the thinker's shape against the copy-bandwidth roofline and, where onnxruntime-gpu is
installed, against ONNX Runtime's QMoE on the same weights in the same process (issue 12).

    python3 bench/h200/moe_kernel_probe.py --json OUT.json [--layers 48] [--no-ort] [--define NAME=VALUE ...]
        [--variants "OMNIEDGE_MOE_WARPS=8,OMNIEDGE_MOE_PAIRS=2" ...]

Builds the library with nvcc (sm_90 and sm_87) into a temporary folder unless --lib names one; --define passes
the decode kernels' tuning macros (kernels/moe_int4/moe_int4_decode.cu). --variants first checks and times the
48-layer decode of each listed macro set (plus the defaults) in one process and reports them side by side, with
the fastest as `best_defines`. Needs omniedge installed (fullsize.sh's install, or `pip install -e .`): the copy
bandwidth is omniedge.bench.roofline's measure. Weights are random codes and scales in omniedge's INT4 layout, one set per layer (so no layer's experts sit in L2 when
the next runs); each layer's router logits are random and fixed, and layer l's output is layer l+1's input,
as in the model. Both contenders run as one CUDA graph of all layers, replayed back to back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# moe_kernel_lib.py beside this file (also under PYTHONSAFEPATH, which fullsize.sh sets)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_kernel_lib import SHAPE, FusedMoE, build, check, check_nan_logits, random_layer, reference

PREFILL = 512  # tokens of the timed prefill


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """GPU time: median over 7 batches of `reps` back-to-back replays (CUDA events), ms per replay."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return sorted(times)[3]


def host_ms(step: Any, reps: int = 200) -> float:
    """Wall time of one step and a wait for the GPU, as a runtime sees it: median of 7 batches of `reps`."""
    step()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        times.append((time.perf_counter() - t0) / reps * 1000)
    return sorted(times)[3]


def copy_bandwidth_gb_s() -> float:
    """The thinker report's measure (omniedge.bench.roofline: a plain 4 GiB device copy), GB/s. A copy captured
    in a CUDA graph, this probe's measure until 2026-12-02, read 2.71-2.77 TB/s on the H200 where this one reads
    4.27 TB/s: graph copies are not the roofline."""
    from omniedge.bench.roofline import measure_copy_bandwidth

    return float(measure_copy_bandwidth() or float("nan")) / 1e9


def active_bytes(sh: dict[str, int]) -> int:
    """Bytes a token reads per layer: k experts' fc1 and fc2 codes and scales."""
    e_bytes = 2 * sh["I"] * sh["H"] // 2 + sh["H"] * sh["I"] // 2
    scale_bytes = 2 * (2 * sh["I"] * sh["H"] // sh["group"] + sh["H"] * sh["I"] // sh["group"])
    return sh["k"] * (e_bytes + scale_bytes)


def chain(fused: FusedMoE, layers: list[dict[str, torch.Tensor]], logits: list[torch.Tensor], xs: list[torch.Tensor],
          sh: dict[str, int]) -> None:  # fmt: skip
    """Layer l's output is layer l+1's input, as in the model (xs: one buffer more than layers)."""
    for i, w in enumerate(layers):
        fused(xs[i], logits[i], w, xs[i + 1], sh["k"], sh["group"])


def time_decode(fused: FusedMoE, layers: list[dict[str, torch.Tensor]], logits: list[torch.Tensor],
                x0: torch.Tensor, sh: dict[str, int]) -> dict[str, float]:  # fmt: skip
    """One token through every layer, captured as one CUDA graph."""
    xs = [x0] + [torch.empty_like(x0) for _ in layers]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        chain(fused, layers, logits, xs, sh)  # outside the capture: scratch allocated, kernels loaded
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(fused, layers, logits, xs, sh)

    def step() -> None:
        g.replay()
        torch.cuda.synchronize()

    return {"gpu_ms_per_step": replay_ms(g, 200), "host_ms_per_step": host_ms(step)}


def time_prefill(fused: FusedMoE, layers: list[dict[str, torch.Tensor]], logits: list[torch.Tensor],
                 x0: torch.Tensor, sh: dict[str, int]) -> float:  # fmt: skip
    """PREFILL tokens through every layer, plain launches, waited for: ms."""
    xs = [x0] + [torch.empty_like(x0) for _ in layers]

    def run() -> None:
        chain(fused, layers, logits, xs, sh)
        torch.cuda.synchronize()

    return host_ms(run, reps=5)


def kernel_breakdown(fused: FusedMoE, layers: list[dict[str, torch.Tensor]], logits: list[torch.Tensor],
                     x0: torch.Tensor, sh: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """GPU time per kernel name over 10 plain (not graph) passes of every layer, from torch.profiler (CUPTI):
    us per layer each, and the whole span per layer; or why the profiler gave nothing."""
    from torch.profiler import ProfilerActivity, profile

    xs = [x0] + [torch.empty_like(x0) for _ in layers]
    chain(fused, layers, logits, xs, sh)
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                chain(fused, layers, logits, xs, sh)
            torch.cuda.synchronize()
    except Exception as e:  # the profiler is optional here: report why
        return {"error": repr(e)}
    per: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us:
            per[ev.key[:60]] = round(us / (10 * len(layers)), 3)
    return {"us_per_layer": per}


def variants(lib_dir: Path, sets: list[tuple[str, ...]], sh: dict[str, int], n: int, gen: torch.Generator) -> list[dict[str, Any]]:  # fmt: skip
    """Each macro set (and the defaults) built, checked at 1 and 3 tokens, and timed over n layers (same weights)."""
    layers = [random_layer(sh["E"], sh["H"], sh["I"], sh["group"], gen) for _ in range(n)]
    logits = [torch.randn(1, sh["E"], device="cuda", generator=gen).half() for _ in layers]
    x0 = torch.randn(1, sh["H"], device="cuda", generator=gen).half()
    rows = []
    for defines in [(), *sets]:
        fused = FusedMoE(build(lib_dir, defines, arch=("90",)))
        diag = any(d.startswith("OMNIEDGE_MOE_DIAG") and not d.endswith("=0") for d in defines)
        row: dict[str, Any] = {"defines": list(defines), "diagnostic": diag}
        if not diag:  # a diagnostic build leaves a stage out on purpose: timed, not checked
            checks = check(fused, [(sh, (1, 3))], gen)
            row.update(ok=all(r["ok"] for r in checks), errors=[r["max_error_over_max"] for r in checks])
        if diag or row["ok"]:
            row.update(time_decode(fused, layers, logits, x0, sh))
            row["us_per_layer_gpu"] = 1000 * row["gpu_ms_per_step"] / n
            row["kernels"] = kernel_breakdown(fused, layers, logits, x0, sh)
        rows.append(row)
        print(f"variant {defines or 'defaults'}: {row}", flush=True)
    return rows


def qmoe_missing() -> str | None:
    """Why ONNX Runtime's CUDA QMoE cannot run here (None: it can)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return str(e)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA provider here"
    return None


def qmoe_chain(layers: list[dict[str, torch.Tensor]], sh: dict[str, int], work: Path) -> Path:
    """The same layers as one ONNX graph of QMoE nodes with the exporter's attributes, any token count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, e = sh["H"], sh["E"]
    inputs = [helper.make_tensor_value_info("x0", TensorProto.FLOAT16, ["T", h])]
    nodes, inits = [], []
    for i, w in enumerate(layers):
        inputs.append(helper.make_tensor_value_info(f"logits{i}", TensorProto.FLOAT16, ["T", e]))
        for name in ("fc1", "fc1_scales", "fc2", "fc2_scales"):
            inits.append(numpy_helper.from_array(w[name].cpu().numpy(), f"l{i}.{name}"))
        nodes.append(helper.make_node(
            "QMoE", [f"x{i}", f"logits{i}", f"l{i}.fc1", f"l{i}.fc1_scales", "", f"l{i}.fc2", f"l{i}.fc2_scales"],
            [f"x{i + 1}"], domain="com.microsoft", k=sh["k"], activation_type="swiglu", swiglu_fusion=1,
            activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1, expert_weight_bits=4,
            weights_prepacked=0, block_size=sh["group"],
        ))  # fmt: skip
    outs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT16, ["T", h]) for i in (len(layers), 1)]
    graph = helper.make_graph(nodes, "qmoe_chain", inputs, outs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    path = work / "qmoe_chain.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=opsets), str(path), save_as_external_data=True,
                    location="qmoe_chain.data")  # fmt: skip
    return path


def time_qmoe(path: Path, logits: list[torch.Tensor], x0: torch.Tensor, cuda_graph: bool) -> tuple[float, torch.Tensor]:  # fmt: skip
    """ms per run (a run and its wait, as a runtime sees it) and the first layer's output."""
    import numpy as np
    import onnxruntime as ort

    options = {"enable_cuda_graph": "1"} if cuda_graph else {}
    sess = ort.InferenceSession(
        str(path), ort.SessionOptions(), providers=[("CUDAExecutionProvider", options)]
    )
    binding = sess.io_binding()
    feeds = {"x0": x0, **{f"logits{i}": lg for i, lg in enumerate(logits)}}
    dev = {n: ort.OrtValue.ortvalue_from_numpy(t.cpu().numpy(), "cuda", 0) for n, t in feeds.items()}
    shape = list(x0.shape)
    last, first = (ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float16, "cuda", 0) for _ in range(2))
    for n, v in dev.items():
        binding.bind_ortvalue_input(n, v)
    binding.bind_ortvalue_output(f"x{len(logits)}", last)
    binding.bind_ortvalue_output("x1", first)
    for _ in range(3):  # with a CUDA graph: the first runs capture it
        sess.run_with_iobinding(binding)
    ms = host_ms(lambda: sess.run_with_iobinding(binding), reps=200 if cuda_graph else 5)
    return ms, torch.from_numpy(first.numpy()).cuda()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--lib", type=Path, help="a built kernels library (default: build with nvcc)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's QMoE")
    p.add_argument("--define", action="append", default=[], help="a decode tuning macro NAME=VALUE")
    p.add_argument("--variants", nargs="*", default=[], help="macro sets to compare, each 'A=1,B=2'")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moe_probe_"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "shape": SHAPE,
    }
    defines = tuple(args.define)
    if args.variants:
        sets = [tuple(v.split(",")) for v in args.variants]
        report["variants"] = variants(work, sets, SHAPE, args.layers, gen)
        timed = [r for r in report["variants"] if r.get("ok") and not r["diagnostic"]]
        if timed:
            defines = tuple(min(timed, key=lambda r: r["gpu_ms_per_step"])["defines"])
        report["best_defines"] = list(defines)
        print(f"best: {list(defines)}", flush=True)
    fused = FusedMoE(args.lib or build(work, defines))
    report["defines"] = list(defines)
    odd = {
        "E": 40,
        "k": 6,
        "H": 1056,
        "I": 352,
        "group": 32,
    }  # 33 chunks of H: lane 0 takes two; no prefill kernels
    report["checks"] = check(fused, [(SHAPE, (1, 3, 64, 300)), (odd, (1, 3, 40))], gen)
    report["checks"] += check_nan_logits(fused, SHAPE, (3, 20), gen)
    if not all(r["ok"] for r in report["checks"]):
        args.json.write_text(json.dumps(report, indent=1))
        raise SystemExit("the fused kernels disagree with the float32 reference")
    sh, n = SHAPE, args.layers
    layers = [random_layer(sh["E"], sh["H"], sh["I"], sh["group"], gen) for _ in range(n)]
    logits = [torch.randn(1, sh["E"], device="cuda", generator=gen).half() for _ in layers]
    x0 = torch.randn(1, sh["H"], device="cuda", generator=gen).half()
    logits_p = [torch.randn(PREFILL, sh["E"], device="cuda", generator=gen).half() for _ in layers]
    xp = torch.randn(PREFILL, sh["H"], device="cuda", generator=gen).half()
    bw = copy_bandwidth_gb_s()
    step_mb = n * active_bytes(sh) / 1e6  # GB/s = MB per step / ms per step
    t = time_decode(fused, layers, logits, x0, sh)
    flops = n * PREFILL * sh["k"] * 2 * 3 * sh["H"] * sh["I"]
    prefill_ms = time_prefill(fused, layers, logits_p, xp, sh)
    report.update(copy_bandwidth_gb_s=bw, active_bytes_per_layer=active_bytes(sh), layers=n)
    report["fused"] = {**t, "us_per_layer_gpu": 1000 * t["gpu_ms_per_step"] / n, "gb_s_gpu": step_mb / t["gpu_ms_per_step"],
                       "of_copy_bandwidth": step_mb / t["gpu_ms_per_step"] / bw,
                       f"prefill_{PREFILL}_ms": prefill_ms, "prefill_tflops": flops / prefill_ms / 1e9}  # fmt: skip
    print(f"fused: {report['fused']}", flush=True)
    report["fused"]["kernels"] = kernel_breakdown(fused, layers, logits, x0, sh)
    print(f"kernels: {report['fused']['kernels']}", flush=True)
    if not args.no_ort and (missing := qmoe_missing()):
        report["qmoe"] = {"skipped": missing}
    elif not args.no_ort:
        try:
            path = qmoe_chain(layers, sh, work)
            q_decode, q0 = time_qmoe(path, logits, x0, cuda_graph=True)
            q_prefill, _ = time_qmoe(path, logits_p, xp, cuda_graph=False)
        except ImportError as e:
            report["qmoe"] = {"skipped": str(e)}
        else:
            y0 = torch.empty_like(x0)
            fused(x0, logits[0], layers[0], y0, sh["k"], sh["group"])
            ref0 = reference(x0, logits[0], layers[0], sh["k"], sh["group"])
            scale = float(ref0.abs().max())
            report["qmoe"] = {
                "host_ms_per_step": q_decode, "decode_speedup_of_fused": q_decode / t["host_ms_per_step"],
                f"prefill_{PREFILL}_ms": q_prefill, "prefill_speedup_of_fused": q_prefill / prefill_ms,
                "layer0_error_over_max": {"qmoe": float((q0.float() - ref0).abs().max()) / scale,
                                          "fused": float((y0.float() - ref0).abs().max()) / scale},
            }  # fmt: skip
        print(f"qmoe: {report['qmoe']}", flush=True)
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
