"""The prefill-memory probe (bench/prefill_memory.py) on the CPU: every heavy op of the thinker runs alone from
the bundle's own weights, and the whole-thinker curve runs its prompts and decode steps. Memory figures need
NVML on a GPU: here they are None, never guessed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from omniedge.bench.prefill_memory import curve, feeds, heavy_nodes, ops, single_node_model


def test_each_heavy_op_runs_alone_from_the_bundle_weights(bundle: Path) -> None:
    rows = ops(bundle, 24, device="cpu")
    kinds = {r["op"] for r in rows}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMul"} <= kinds
    assert kinds & {"QMoE", "MoE"}
    for r in rows:
        assert "error" not in r, r
        assert r["ms_at_24"] >= 0 and r["workspace_at_24_mib"] is None  # no NVML on the CPU
    assert not list(bundle.rglob(".probe-*.onnx"))  # the scratch models are gone


def test_a_single_op_model_computes_what_the_node_computes_in_the_graph(bundle: Path) -> None:
    from omniedge.runtime.manifest import load_manifest

    m = load_manifest(bundle)
    path = Path(m.components["thinker"].onnx)
    model = onnx.load(str(path), load_external_data=False)
    node = next(n for n in heavy_nodes(model) if n.op_type == "MatMul")  # the first router
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    probe = path.parent / ".probe-test.onnx"
    onnx.save(single_node_model(model, node, 1), str(probe))
    try:
        x, outs = feeds(node, 5, m.text.hidden_size, m.text.head_dim, np.float32, dims)
        (y,) = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"]).run(None, x)
    finally:
        probe.unlink()
    w = onnx.numpy_helper.to_array(
        next(i for i in onnx.load(str(path)).graph.initializer if i.name == node.input[1])
    )
    assert y.shape == outs[node.output[0]]
    np.testing.assert_allclose(y, next(iter(x.values())) @ w, rtol=1e-5, atol=1e-5)


def test_the_whole_thinker_curve_runs_prompts_then_decode_steps(bundle: Path) -> None:
    r = curve(bundle, [8, 16], [16, 5], steps=3, providers="cpu")
    assert [p["tokens"] for p in r["prefills"]] == [8, 16, 16, 5]
    assert r["max_context"] == 16 + 3 + 8 and r["weights_mib"] > 0 and r["kv_cache_mib"] > 0
    assert r["after_decode_mib"] is None and r["overhead_over_weights_plus_kv"] is None
