"""CPU vs CUDA execution provider, node by node, on one float16 thinker graph: which op's output differs first.

    python bench/h200/diag_ops.py BUNDLE/thinker.onnx      (on a machine with onnxruntime-gpu)

Every MatMulNBits, norm, GroupQueryAttention, QMoE, MatMul and Split output becomes a graph output; both
providers run one 12-token prefill of random embeddings; the table shows max |cpu - cuda| / max |cpu|.
It found QMoE's CUDA weight layout default (weights_prepacked=-1) on 2026-12-01.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OPS = (
    "MatMulNBits",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "GroupQueryAttention",
)
OPS += ("QMoE", "MoE", "MatMul", "Split")


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def main(path: str, seq: int = 12, rows: int = 32) -> None:
    model = onnx.load(path)
    outputs = {o.name for o in model.graph.output}
    probes = []
    for node in model.graph.node:
        if node.op_type in OPS and node.output[0] and node.output[0] not in outputs:
            model.graph.output.append(
                helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT16, None)
            )
            probes.append((node.op_type, node.output[0]))
    probe_path = str(Path(tempfile.mkdtemp()) / "probes.onnx")
    onnx.save(model, probe_path)
    inputs = {i.name: i for i in model.graph.input}
    hidden = _dims(inputs["inputs_embeds"])[2]
    _, kv_heads, _, head_dim = _dims(inputs["past_key_values.0.key"])
    rng = np.random.default_rng(0)
    angles = np.arange(rows)[:, None] / (10000 ** (np.arange(0, head_dim, 2) / head_dim))
    feed = {
        "inputs_embeds": (rng.standard_normal((1, seq, hidden)) * 0.05).astype(np.float16),
        "position_ids": np.arange(seq, dtype=np.int64)[None],
        "seqlens_k": np.array([seq - 1], np.int32),
        "total_sequence_length": np.array(seq, np.int32),
        "cos_cache": np.cos(angles).astype(np.float16),
        "sin_cache": np.sin(angles).astype(np.float16),
    }
    if "logits_index" in inputs:  # graphs exported since the runtime pads prompts
        feed["logits_index"] = np.array([seq - 1], np.int64)
    if "deepstack_embeds" in inputs:
        feed["deepstack_embeds"] = np.zeros(
            (_dims(inputs["deepstack_embeds"])[0], 1, seq, hidden), np.float16
        )
    for name in inputs:
        if name.startswith("past_key_values"):
            feed[name] = np.zeros((1, kv_heads, rows, head_dim), np.float16)
    results = {}
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        session = ort.InferenceSession(probe_path, providers=[provider])
        names = [o.name for o in session.get_outputs()]
        results[provider] = dict(zip(names, session.run(None, feed), strict=True))
    cpu, cuda = results["CPUExecutionProvider"], results["CUDAExecutionProvider"]
    for op, name in [("graph output", "logits"), *probes]:
        a, b = cpu[name].astype(np.float32), cuda[name].astype(np.float32)
        print(f"{op:34s} {name:40s} rel {np.abs(a - b).max() / (np.abs(a).max() + 1e-9):.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
