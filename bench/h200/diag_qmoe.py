"""QMoE on the CUDA and CPU providers against a numpy reference, for a few layout/attribute variants."""
import numpy as np, onnxruntime as ort
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
E, H, I, K, T, B = 8, 256, 128, 2, 6, 128
rng = np.random.default_rng(0)
def quant(w):  # [E, N, Kd] -> packed [E, N, Kd/2], scales [E, N, Kd/B]
    e, n, kd = w.shape; g = w.reshape(e, n, kd // B, B); s = np.maximum(np.abs(g).max(-1) / 7, 1e-8)
    q = (np.clip(np.round(g / s[..., None]), -8, 7) + 8).astype(np.uint8).reshape(e, n, kd)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), s.astype(np.float32), ((q.astype(np.float32) - 8).reshape(e, n, kd // B, B) * s[..., None]).reshape(e, n, kd)
gate, up, down = (rng.standard_normal(s).astype(np.float32) * 0.05 for s in ((E, I, H), (E, I, H), (E, H, I)))
x = (rng.standard_normal((T, H)) * 0.5).astype(np.float32); logits = rng.standard_normal((T, E)).astype(np.float32)
inter = np.stack([gate, up], 2).reshape(E, 2 * I, H); concat = np.concatenate([gate, up], 1)
def ref(g_, u_, d_):
    p = np.exp(logits - logits.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, -1)[:, :K]; w = np.take_along_axis(p, idx, -1); w /= w.sum(-1, keepdims=True); y = np.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]; a = g_[e] @ x[t]; b = u_[e] @ x[t]; y[t] += w[t, j] * (d_[e] @ (a / (1 + np.exp(-a)) * b))
    return y
def run(fc1w, fc1s, fc2w, fc2s, ep, **attrs):
    node = h.make_node("QMoE", ["x", "r", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft", **attrs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", TP.FLOAT16, [T, H]), h.make_tensor_value_info("r", TP.FLOAT16, [T, E])],
        [h.make_tensor_value_info("y", TP.FLOAT16, [T, H])], initializer=[nh.from_array(fc1w, "w1"), nh.from_array(fc1s.astype(np.float16), "s1"), nh.from_array(fc2w, "w2"), nh.from_array(fc2s.astype(np.float16), "s2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    try:
        return ort.InferenceSession(m.SerializeToString(), providers=[ep]).run(None, {"x": x.astype(np.float16), "r": logits.astype(np.float16)})[0].astype(np.float32)
    except Exception as e:
        return str(e).splitlines()[0][:150]
q1i, s1i, d1i = quant(inter); q1c, s1c, d1c = quant(concat); q2, s2, d2 = quant(down)
r_i = ref(d1i[:, 0::2], d1i[:, 1::2], d2); r_c = ref(d1c[:, :I], d1c[:, I:], d2)
base = dict(k=K, activation_type="swiglu", expert_weight_bits=4, normalize_routing_weights=1, block_size=B)
swap = lambda q: ((q >> 4) | (q << 4)).astype(np.uint8)  # noqa: E731
signed = lambda q: (q ^ 0x88).astype(np.uint8)  # noqa: E731  offset binary -> two's complement nibbles
def colmajor(q, n, kd):  # [E, N, Kd/2] -> bytes of the unpacked [E, Kd, N] packed along N, in the declared shape
    lo, hi = q & 0xF, q >> 4; u = np.stack([lo, hi], -1).reshape(q.shape[0], n, kd).transpose(0, 2, 1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8).reshape(q.shape)
V2 = {
    "nibbles swapped": (swap(q1i), s1i, swap(q2), s2),
    "signed nibbles (xor 0x88)": (signed(q1i), s1i, signed(q2), s2),
    "column-major packing": (colmajor(q1i, 2 * I, H), s1i, colmajor(q2, H, I), s2),
    "column-major + signed": (signed(colmajor(q1i, 2 * I, H)), s1i, signed(colmajor(q2, H, I)), s2),
}
def quant_pc(w):  # per output channel (one scale per row)
    e, n, kd = w.shape; s = np.maximum(np.abs(w).max(-1) / 7, 1e-8)
    q = (np.clip(np.round(w / s[..., None]), -8, 7) + 8).astype(np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), s.astype(np.float32), (q.astype(np.float32) - 8) * s[..., None]
p1, ps1, pd1 = quant_pc(inter); p2, ps2, pd2 = quant_pc(down); r_pc = ref(pd1[:, 0::2], pd1[:, 1::2], pd2)
pc = dict(k=K, activation_type="swiglu", expert_weight_bits=4, normalize_routing_weights=1, swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
for ep in ("CPUExecutionProvider", "CUDAExecutionProvider"):
    y = run(p1, ps1, p2, ps2, ep, **pc)
    print(f"{'per-channel scales, no block_size':40s} {ep[:4]}", y if isinstance(y, str) else f"rel err {np.abs(y - r_pc).max() / np.abs(r_pc).max():.2e}")
def run_moe(fc1, fc2, ep, **attrs):
    node = h.make_node("MoE", ["x", "r", "w1", "", "w2"], ["y"], domain="com.microsoft", **attrs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", TP.FLOAT16, [T, H]), h.make_tensor_value_info("r", TP.FLOAT16, [T, E])],
        [h.make_tensor_value_info("y", TP.FLOAT16, [T, H])], initializer=[nh.from_array(fc1.astype(np.float16), "w1"), nh.from_array(fc2.astype(np.float16), "w2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    try:
        return ort.InferenceSession(m.SerializeToString(), providers=[ep]).run(None, {"x": x.astype(np.float16), "r": logits.astype(np.float16)})[0].astype(np.float32)
    except Exception as e:
        return str(e).splitlines()[0][:150]
r_f = ref(gate, up, down)
fl = dict(k=K, activation_type="swiglu", normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)
for nm, w1, att in (("MoE float interleaved fusion1", inter, dict(fl, swiglu_fusion=1)), ("MoE float concat fusion2", concat, dict(fl, swiglu_fusion=2))):
    for ep in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        y = run_moe(w1, down, ep, **att)
        print(f"{nm:40s} {ep[:4]}", y if isinstance(y, str) else f"rel err {np.abs(y - r_f).max() / np.abs(r_f).max():.2e}")
T_ = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))  # noqa: E731
V2["column-major + scales transposed"] = (colmajor(q1i, 2 * I, H), T_(s1i), colmajor(q2, H, I), T_(s2))
V2["signed + scales transposed"] = (signed(q1i), T_(s1i), signed(q2), T_(s2))
V2["colmajor+signed+scales T"] = (signed(colmajor(q1i, 2 * I, H)), T_(s1i), signed(colmajor(q2, H, I)), T_(s2))
a1 = dict(base, swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
for name, (w1, sc1, w2, sc2) in V2.items():
    y = run(w1, sc1, w2, sc2, "CUDAExecutionProvider", **a1)
    print(f"{name:40s} CUDA", y if isinstance(y, str) else f"rel err {np.abs(y - r_i).max() / np.abs(r_i).max():.2e}")
variants = {
    "fusion1 interleaved, alpha1 beta0": (q1i, s1i, r_i, dict(base, swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)),
    "fusion1 interleaved, default attrs": (q1i, s1i, r_i, dict(base, swiglu_fusion=1)),
    "fusion2 concat, alpha1 beta0": (q1c, s1c, r_c, dict(base, swiglu_fusion=2, activation_alpha=1.0, activation_beta=0.0)),
    "fusion1 interleaved, limit 1e4": (q1i, s1i, r_i, dict(base, swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, swiglu_limit=1e4)),
    "fusion1, scales transposed": (q1i, np.ascontiguousarray(s1i.transpose(0, 2, 1)), r_i, dict(base, swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)),
}
for name, (w1, s1, r, attrs) in variants.items():
    for ep in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        y = run(w1, s1, q2, s2 if "transposed" not in name else np.ascontiguousarray(s2.transpose(0, 2, 1)), ep, **attrs)
        msg = y if isinstance(y, str) else f"rel err {np.abs(y - r).max() / np.abs(r).max():.2e}"
        print(f"{name:40s} {ep[:4]} {msg}")
