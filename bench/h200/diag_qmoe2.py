"""More QMoE CUDA probes: 8-bit experts, other block sizes, weights_prepacked=0, the real expert shape."""
import numpy as np, onnxruntime as ort
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
def case(E, H, I, K, T, B, bits, extra, seed=0):
    rng = np.random.default_rng(seed)
    gate, up, down = (rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((E, I, H), (E, I, H), (E, H, I)))
    x = (rng.standard_normal((T, H)) * 0.5).astype(np.float32); lg = rng.standard_normal((T, E)).astype(np.float32)
    qmax = 7 if bits == 4 else 127; zp = 8 if bits == 4 else 128
    def quant(w):
        e, n, kd = w.shape; bb = B or kd; g = w.reshape(e, n, kd // bb, bb); s = np.maximum(np.abs(g).max(-1) / qmax, 1e-8)
        q = (np.clip(np.round(g / s[..., None]), -qmax - 1, qmax) + zp).astype(np.uint8).reshape(e, n, kd)
        deq = ((q.astype(np.float32) - zp).reshape(e, n, kd // bb, bb) * s[..., None]).reshape(e, n, kd)
        if bits == 4:
            q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        return q, (s if B else s[..., 0]).astype(np.float16), deq
    inter = np.stack([gate, up], 2).reshape(E, 2 * I, H)
    q1, s1, d1 = quant(inter); q2, s2, d2 = quant(down)
    p = np.exp(lg - lg.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, -1)[:, :K]; w = np.take_along_axis(p, idx, -1); w /= w.sum(-1, keepdims=True); r = np.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]; a = d1[e, 0::2] @ x[t]; b = d1[e, 1::2] @ x[t]; r[t] += w[t, j] * (d2[e] @ (a / (1 + np.exp(-a)) * b))
    attrs = dict(k=K, activation_type="swiglu", expert_weight_bits=bits, normalize_routing_weights=1, swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, **extra)
    if B:
        attrs["block_size"] = B
    node = h.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft", **attrs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", TP.FLOAT16, [T, H]), h.make_tensor_value_info("r", TP.FLOAT16, [T, E])],
        [h.make_tensor_value_info("y", TP.FLOAT16, [T, H])], initializer=[nh.from_array(q1, "w1"), nh.from_array(s1, "s1"), nh.from_array(q2, "w2"), nh.from_array(s2, "s2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    out = []
    for ep in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        try:
            y = ort.InferenceSession(m.SerializeToString(), providers=[ep]).run(None, {"x": x.astype(np.float16), "r": lg.astype(np.float16)})[0].astype(np.float32)
            out.append(f"{ep[:4]} {np.abs(y - r).max() / np.abs(r).max():.2e}")
        except Exception as e:
            out.append(f"{ep[:4]} {str(e).splitlines()[0][:80]}")
    print(f"E{E} H{H} I{I} k{K} T{T} block {B} bits {bits} {extra}: " + " | ".join(out), flush=True)
case(8, 256, 128, 2, 6, 128, 8, {})
case(8, 256, 128, 2, 6, None, 8, {})
case(8, 256, 128, 2, 6, 64, 4, {})
case(8, 256, 128, 2, 6, 128, 4, {"weights_prepacked": 0})
case(8, 256, 128, 2, 1, 128, 4, {})
case(64, 2048, 768, 8, 1, 128, 4, {})
case(64, 2048, 768, 8, 16, 128, 4, {})
case(8, 256, 128, 2, 6, 128, 4, {"accuracy_level": 4})
