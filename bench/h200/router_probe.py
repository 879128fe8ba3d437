"""The MoE router's matmul alone, in the forms ONNX Runtime's CUDA provider can run it, timed on the device:
`python bench/h200/router_probe.py --json OUT [--hidden 2048 --experts 64 --layers 48]`.

The 30B thinker's decode profile puts the float router at 4.9 us per layer for 0.26 MB (MatMul over W^T in
float16: bench/results/2026-12-01-h200-decode-host-share.md). Each variant here is a graph of `--layers` router
matmuls on one input (each its own weight, outputs concatenated), run by ONNX Runtime's CUDA provider:
- decode (one token): replayed as a CUDA graph, `--steps` runs queued back to back per batch, one synchronize:
  the device's time per graph; the difference between two variants over `--layers` is their difference per
  router;
- prefill (`--prefill` tokens): plain runs, p50 of `--steps // 10`.
Variants: "matmul" (today's graph: MatMul over W^T [hidden, experts]), "gemm" (Gemm transB=1 over W
[experts, hidden], the same float16 values), and for scale "int8 g32/g128" and "int4 g128" (MatMulNBits,
symmetric round to nearest): these change the router's values, so each row also reports the largest logit
error against float32 and how often the top-k set of experts differs from float32's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"


def _nbits(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [N, K] -> (MatMulNBits B uint8 [N, K/block, block*bits/8], scales [N*K/block], dequantized W)."""
    n, k = w.shape
    g = w.reshape(n, k // block, block).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scales = np.maximum(np.abs(g).max(-1) / qmax, 1e-8).astype(np.float16)
    codes = np.clip(np.round(g / scales[..., None].astype(np.float32)), -qmax - 1, qmax)
    deq = (codes * scales[..., None].astype(np.float32)).reshape(n, k)
    u = (codes + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return u, scales.reshape(-1), deq


def build(variant: str, weights: list[np.ndarray], hidden: int) -> tuple[bytes, list[np.ndarray]]:
    """The graph x [T, hidden] -> concat of every router's logits; returns it and the weights it computes with."""
    nodes, inits, used = [], [], []
    outs = []
    for i, w in enumerate(weights):  # w: [experts, hidden] float32
        n = w.shape[0]
        y = f"y{i}"
        if variant in ("matmul", "gemm"):
            w16 = w.astype(np.float16)
            used.append(w16.astype(np.float32))
            if variant == "matmul":
                inits.append(numpy_helper.from_array(np.ascontiguousarray(w16.T), f"w{i}"))
                nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [y]))
            else:
                inits.append(numpy_helper.from_array(w16, f"w{i}"))
                nodes.append(helper.make_node("Gemm", ["x", f"w{i}"], [y], transB=1))
        else:
            bits, block = (8, int(variant.split("g")[1])) if variant.startswith("int8") else (4, 128)
            b, s, deq = _nbits(w, bits, block)
            used.append(deq)
            inits += [numpy_helper.from_array(b, f"b{i}"), numpy_helper.from_array(s, f"s{i}")]
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    ["x", f"b{i}", f"s{i}"],
                    [y],
                    domain=MS,
                    K=hidden,
                    N=n,
                    bits=bits,
                    block_size=block,
                )
            )
        outs.append(y)
    parts = [f"part{j}" for j in range(0, len(outs), 16)]  # CUDA graph capture: Concat takes <= 32 inputs
    for j, name in zip(range(0, len(outs), 16), parts, strict=True):
        nodes.append(helper.make_node("Concat", outs[j : j + 16], [name], axis=-1))
    nodes.append(helper.make_node("Concat", parts, ["logits"], axis=-1))
    g = helper.make_graph(
        nodes,
        "routers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", hidden])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT16, ["T", sum(w.shape[0] for w in weights)]
            )
        ],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    m.ir_version = 10
    return m.SerializeToString(), used


def time_variant(
    ort: Any, model: bytes, x1: np.ndarray, xp: np.ndarray, n_out: int, steps: int
) -> dict[str, Any]:
    so = ort.SessionOptions()
    sess = ort.InferenceSession(model, so, providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    xv = ort.OrtValue.ortvalue_from_numpy(x1, "cuda", 0)
    yv = ort.OrtValue.ortvalue_from_shape_and_type([1, n_out], np.float16, "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input("x", xv)
    io.bind_ortvalue_output("logits", yv)
    for _ in range(20):
        sess.run_with_iobinding(io)
    queued = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(steps):
            sess.run_with_iobinding(io)
        io.synchronize_outputs()
        queued.append((time.perf_counter() - t) * 1e6 / steps)
    decode_out = yv.numpy().astype(np.float32)
    plain = ort.InferenceSession(model, so, providers=["CUDAExecutionProvider"])
    for _ in range(3):
        plain.run(None, {"x": xp})
    times = []
    for _ in range(max(steps // 10, 5)):
        t = time.perf_counter()
        plain.run(None, {"x": xp})
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "decode_graph_us": round(float(np.median(queued)), 2),
        "decode_graph_us_by_batch": [round(q, 2) for q in queued],
        "prefill_ms_p50": round(float(np.median(times)), 3),
        "decode_out": decode_out,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--variants", nargs="+", default=["matmul", "gemm", "int8 g32", "int8 g128", "int4 g128"])
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    import onnxruntime as ort

    ort.preload_dlls()
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.02, (a.experts, a.hidden)).astype(np.float32) for _ in range(a.layers)]
    x1 = rng.normal(0, 1, (1, a.hidden)).astype(np.float16)
    xp = rng.normal(0, 1, (a.prefill, a.hidden)).astype(np.float16)
    ref = [x1.astype(np.float32) @ w.T for w in weights]  # float32 logits per router
    rows = []
    for v in a.variants:
        model, _ = build(v.replace(" ", "_"), weights, a.hidden)
        r = time_variant(ort, model, x1, xp, a.experts * a.layers, a.steps)
        out = r.pop("decode_out").reshape(a.layers, a.experts)
        err = max(float(np.abs(out[i] - ref[i][0]).max() / np.abs(ref[i][0]).max()) for i in range(a.layers))
        topk = lambda z: set(np.argsort(-z)[: a.top_k].tolist())  # noqa: E731
        differ = sum(topk(out[i]) != topk(ref[i][0]) for i in range(a.layers))
        rows.append({"variant": v, **r, "max_logit_err_over_max": round(err, 5), "topk_sets_differ": differ})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["decode_graph_us"]
    for r in rows:
        r["per_router_us_vs_first"] = round((r["decode_graph_us"] - base) / a.layers, 3)
    args = sys.argv[1:] if argv is None else argv
    res = {"command": " ".join(["python bench/h200/router_probe.py", *args]), "rows": rows}
    a.json.write_text(json.dumps(res, indent=1))
    for r in rows:
        print(
            f"{r['variant']:<10} decode graph {r['decode_graph_us']:8.2f} us ({r['per_router_us_vs_first']:+.3f} us per router vs "
            f"{rows[0]['variant']}), prefill {r['prefill_ms_p50']:.3f} ms, logit err {r['max_logit_err_over_max']}, "
            f"top-{a.top_k} differs in {r['topk_sets_differ']}/{a.layers}"
        )


if __name__ == "__main__":
    main()
