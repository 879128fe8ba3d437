"""CPU vs CUDA execution provider, node by node, on one float16 thinker graph: which op's output differs first."""
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
path = sys.argv[1]
m = onnx.load(path)
names = []
for n in m.graph.node:
    if n.op_type in ("MatMulNBits", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention", "QMoE", "MatMul", "Split"):
        o = n.output[0]
        if o and o not in [x.name for x in m.graph.output]:
            m.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT16, None)); names.append((n.op_type, o))
data = "/tmp/diag.onnx"; onnx.save(m, data)
rng = np.random.default_rng(0)
ins = {i.name: i for i in m.graph.input}
S, H = 12, ins["inputs_embeds"].type.tensor_type.shape.dim[2].dim_value
kv = ins["past_key_values.0.key"].type.tensor_type.shape.dim
nkv, hd = kv[1].dim_value, kv[3].dim_value
M = 32
feed = {"inputs_embeds": (rng.standard_normal((1, S, H)) * 0.05).astype(np.float16), "position_ids": np.arange(S, dtype=np.int64)[None],
        "seqlens_k": np.array([S - 1], np.int32), "total_sequence_length": np.array(S, np.int32)}
inv = 1.0 / (10000 ** (np.arange(0, hd, 2) / hd)); ang = np.arange(M)[:, None] * inv
feed["cos_cache"], feed["sin_cache"] = np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)
if "deepstack_embeds" in ins:
    d = ins["deepstack_embeds"].type.tensor_type.shape.dim[0].dim_value
    feed["deepstack_embeds"] = np.zeros((d, 1, S, H), np.float16)
for k in ins:
    if k.startswith("past_key_values"):
        feed[k] = np.zeros((1, nkv, M, hd), np.float16)
outs = {}
for ep in ("CPUExecutionProvider", "CUDAExecutionProvider"):
    s = ort.InferenceSession(data, providers=[ep])
    outs[ep] = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
a, b = outs["CPUExecutionProvider"], outs["CUDAExecutionProvider"]
for op, o in [("out", "logits")] + names[:40]:
    x, y = a[o].astype(np.float32), b[o].astype(np.float32)
    print(f"{op:34s} {o:28s} shape {x.shape} rel {np.abs(x - y).max() / (np.abs(x).max() + 1e-9):.2e}")
