"""INT4 quantizers (RTN, clip search, GPTQ, AWQ): layout, accuracy against RTN, fallbacks, errors, folds."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from omniedge import int4
from omniedge.compress.moe import topk_route
from omniedge.compress.quantizers import (
    AWQ,
    GPTQ,
    RTN,
    InputObserver,
    InputStats,
    Packed,
    convert_for_runtime,
    create_quantized_state_dict,
    grid,
    make_quantizer,
    refuse_quantized,
    relative_output_error,
)
from omniedge.compress.quantizers import awq as awq_mod
from omniedge.compress.quantizers.gptq import gptq_codes
from omniedge.errors import OmniedgeError


def _inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with a shared rank-8 component about as large as each channel's own noise (correlated
    channels) and 8 outlier channels 20x larger, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.03 * torch.randn(k, 8, generator=torch.Generator().manual_seed(99)) @ torch.randn(
        8, k, generator=torch.Generator().manual_seed(98)
    )
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :8] *= 20.0
    return x


def _weight(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _observe(x: torch.Tensor, samples: int = 256, expert_rows: list[int] | None = None) -> InputStats:
    """Stats of x for a Linear, or (expert_rows) for experts that each saw the given number of rows."""
    k = x.shape[-1]
    if expert_rows is None:
        obs = InputObserver(k, hessian=True, samples=samples)
        obs.add(x)
        return obs.stats()
    obs = InputObserver(k, len(expert_rows), hessian=True, samples=samples)
    start = 0
    for e, n in enumerate(expert_rows):
        obs.add(x[start : start + n], e)
        start += n
    return obs.stats()


def _out_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - w_hat).T).square().sum() / (x @ w.T).square().sum())


def _awq_weight(q: AWQ, w: torch.Tensor, stats: InputStats, **kw: Any) -> tuple[torch.Tensor, Packed]:
    """What AWQ makes of w: the effective float weight (dequantized / s) and the packed scaled weight."""
    s = q.input_scale([w], stats, **kw)
    assert s is not None
    scale = s.unsqueeze(-2)
    packed = q.quantize(w * scale, stats.scaled(s))
    return packed.dequantize() / scale, packed


# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize(("k", "group"), [(256, 128), (200, 32), (4304, 128)])
def test_rtn_is_int4_quantize(k: int, group: int) -> None:
    w = _weight(6, k)
    packed = RTN(group_size=group).quantize(w)
    q, s = int4.quantize(w, group)
    assert torch.equal(packed.qweight, q) and torch.equal(packed.scales, s)
    assert packed.zero_points is None


def _methods(group: int, symmetric: bool) -> list[Any]:
    common = {"group_size": group, "symmetric": symmetric}
    return [
        RTN(**common),
        RTN(clip_search=True, **common),
        GPTQ(**common),
        GPTQ(act_order=True, **common),
        AWQ(**common),
    ]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "group"), [(300, 32), (300, 64), (300, 128)])
def test_every_method_writes_the_int4_layout(k: int, group: int, symmetric: bool) -> None:
    """uint8 [..., N, ceil(K/g), g/2], float32 scales [..., N, ceil(K/g)], packed zero points when
    asymmetric; omniedge.int4.dequantize gives back the values each method chose."""
    x = _inputs(k + 64, k, seed=3)
    w = _weight(2, 8, k)
    stats = _observe(x, samples=64, expert_rows=[k + 32, 32])
    nb = math.ceil(k / group)
    for q in _methods(group, symmetric):
        packed = q.quantize(w, stats)
        assert packed.qweight.dtype == torch.uint8 and tuple(packed.qweight.shape) == (2, 8, nb, group // 2)
        assert packed.scales.dtype == torch.float32 and tuple(packed.scales.shape) == (2, 8, nb)
        if symmetric:
            assert packed.zero_points is None
        else:
            assert packed.zero_points is not None
            assert tuple(packed.zero_points.shape) == (2, 8, (nb + 1) // 2)
        w_hat = packed.dequantize()
        assert w_hat.shape == w.shape
        # Every dequantized group value lies on its group's grid: (code - zero) * scale.
        codes = torch.round(grid.to_groups(w_hat, group) / packed.scales.unsqueeze(-1))
        zeros = 8.0 if symmetric else int4.unpack(packed.zero_points)[..., :nb].unsqueeze(-1).float()
        assert bool(((codes + zeros) >= 0).all() and ((codes + zeros) <= 15).all()), type(q).__name__


def test_gptq_codes_round_trip_through_the_packing() -> None:
    x = _inputs(512, 200, seed=4)
    h = (x.T @ x)[None]
    w = _weight(1, 16, 200)
    for sym in (True, False):
        c = gptq_codes(w, h, 32, sym)
        packed = Packed.from_codes(c, 200, sym)
        assert torch.equal(packed.dequantize(), c.dequantize(200))


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_matmulnbits_computes_the_packed_weight(symmetric: bool) -> None:
    """ORT's MatMulNBits (zero points as its packed uint8 input) agrees with int4.dequantize."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    n, k, group = 24, 200, 32
    packed = GPTQ(group_size=group, symmetric=symmetric).quantize(_weight(n, k), _observe(_inputs(400, k, 5)))
    inits = [
        numpy_helper.from_array(packed.qweight.numpy(), "B"),
        numpy_helper.from_array(packed.scales.reshape(-1).numpy(), "scales"),
    ]
    ins = ["A", "B", "scales"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points.reshape(-1).numpy(), "zp"))
        ins.append("zp")
    node = helper.make_node(
        "MatMulNBits", ins, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=group
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = torch.randn(3, k)
    (y,) = sess.run(None, {"A": a.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), a @ packed.dequantize().T, rtol=1e-4, atol=1e-4)
    assert onnx is not None


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_qmoe_computes_the_packed_experts(symmetric: bool) -> None:
    """ORT's QMoE (swiglu, gate/up rows interleaved, zero points in slots 11/12) agrees with Qwen3's
    softmax -> top-k -> renormalise over int4.dequantize'd experts."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    e, hid, inter, t, k, group = 4, 256, 128, 6, 2, 64
    q = RTN(group_size=group, symmetric=symmetric)
    gate, up, down = (
        _weight(e, inter, hid, seed=1),
        _weight(e, inter, hid, seed=2),
        _weight(e, hid, inter, seed=3),
    )
    fc1 = q.quantize(torch.stack((gate, up), 2).reshape(e, 2 * inter, hid) * 0.1)
    fc2 = q.quantize(down * 0.1)
    arrays = {"fc1": fc1.qweight.reshape(e, 2 * inter, -1), "s1": fc1.scales}
    arrays |= {"fc2": fc2.qweight.reshape(e, hid, -1), "s2": fc2.scales}
    ins = ["x", "r", "fc1", "s1", "", "fc2", "s2"]
    if not symmetric:
        assert fc1.zero_points is not None and fc2.zero_points is not None
        arrays |= {"z1": fc1.zero_points, "z2": fc2.zero_points}
        ins += ["", "", "", "", "z1", "z2"]
    node = helper.make_node(
        "QMoE",
        ins,
        ["y"],
        domain="com.microsoft",
        k=k,
        activation_type="swiglu",
        swiglu_fusion=1,
        expert_weight_bits=4,
        block_size=group,
        normalize_routing_weights=1,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [t, hid]), ("r", [t, e]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, hid])],
        [numpy_helper.from_array(v.numpy(), n) for n, v in arrays.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    x, logits = torch.randn(t, hid), torch.randn(t, e)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy(), "r": logits.numpy()})
    w1 = fc1.dequantize().reshape(e, inter, 2, hid)
    w2 = fc2.dequantize()
    weights, experts = topk_route(logits, k)
    ref = torch.zeros(t, hid)
    for i in range(t):
        for j in range(k):
            n = int(experts[i, j])
            h = torch.nn.functional.silu(w1[n, :, 0] @ x[i]) * (w1[n, :, 1] @ x[i])
            ref[i] += weights[i, j] * (w2[n] @ h)
    torch.testing.assert_close(torch.from_numpy(y), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_and_awq_beat_rtn_and_clip_search_beats_rtn(symmetric: bool) -> None:
    """On held-out inputs with correlated and outlier channels, GPTQ and AWQ reconstruct W x better than
    RTN; the clip search never has a larger weight error than RTN (its objective)."""
    k, group = 256, 32
    w = _weight(96, k)
    train, test = _inputs(2048, k, seed=10), _inputs(2048, k, seed=11)
    stats = _observe(train)
    rtn = RTN(group_size=group, symmetric=symmetric).quantize(w).dequantize()
    clip = RTN(group_size=group, symmetric=symmetric, clip_search=True).quantize(w).dequantize()
    gptq = GPTQ(group_size=group, symmetric=symmetric).quantize(w, stats).dequantize()
    gptq_ao = GPTQ(group_size=group, symmetric=symmetric, act_order=True).quantize(w, stats).dequantize()
    awq, _ = _awq_weight(AWQ(group_size=group, symmetric=symmetric), w, stats)
    e = {
        name: _out_err(w, wh, test)
        for name, wh in [("rtn", rtn), ("gptq", gptq), ("gptq_ao", gptq_ao), ("awq", awq), ("clip", clip)]
    }
    assert e["gptq"] < 0.8 * e["rtn"], e
    assert e["gptq_ao"] < 0.8 * e["rtn"], e
    assert e["awq"] < 0.9 * e["rtn"], e
    assert (w - clip).square().sum() <= (w - rtn).square().sum()
    # The report's error measure agrees with the direct one on the calibration rows.
    assert relative_output_error(w, gptq, stats) == pytest.approx(_out_err(w, gptq, train), rel=1e-3)


def test_fused_experts_use_their_own_tokens_and_fall_back_when_few() -> None:
    """Each expert is quantized from its own routed rows; an expert under the minimum gets RTN with
    clip search (GPTQ) or no scale and a weight-MSE clip (AWQ), and is counted."""
    k, group = 128, 32
    w = _weight(3, 48, k, seed=2)
    x = _inputs(600, k, seed=12)
    rows = [300, 290, 10]
    stats = _observe(x, expert_rows=rows)
    test = _inputs(1024, k, seed=13)

    gptq = GPTQ(group_size=group).quantize(w, stats)
    assert gptq.fallback == 1
    clip = RTN(group_size=group, clip_search=True).quantize(w[2:])
    assert torch.equal(gptq.qweight[2:], clip.qweight) and torch.equal(gptq.scales[2:], clip.scales)
    rtn = RTN(group_size=group).quantize(w).dequantize()
    for e in (0, 1):
        assert _out_err(w[e], gptq.dequantize()[e], test) < 0.8 * _out_err(w[e], rtn[e], test)

    q = AWQ(group_size=group, min_rows=16)
    s = q.input_scale([w], stats, per_expert=True)
    assert s is not None and s.shape == (3, k)
    assert torch.equal(s[2], torch.ones(k))  # too few rows: no scale
    awq_w, packed = _awq_weight(q, w, stats, per_expert=True)
    assert packed.fallback == 1
    for e in (0, 1):
        assert _out_err(w[e], awq_w[e], test) < _out_err(w[e], rtn[e], test)


def test_awq_shared_scale_over_experts() -> None:
    """moe_in: one scale for every expert (they share the norm), chosen on all routed rows."""
    k = 128
    w = _weight(4, 32, k, seed=5)
    stats = _observe(_inputs(800, k, seed=14), expert_rows=[200, 200, 200, 200])
    q = AWQ(group_size=32)
    s = q.input_scale([w], stats)
    assert s is not None and s.shape == (k,)
    awq_w, _ = _awq_weight(q, w, stats)
    rtn = RTN(group_size=32).quantize(w).dequantize()
    test = _inputs(1024, k, seed=15)
    total = lambda wh: sum(_out_err(w[e], wh[e], test) for e in range(4))  # noqa: E731
    assert total(awq_w) < total(rtn)


# ---------------------------------------------------------------- errors


def test_clear_errors() -> None:
    with pytest.raises(OmniedgeError, match="group size 100"):
        make_quantizer("gptq", group_size=100)
    with pytest.raises(OmniedgeError, match="unknown quantization method"):
        make_quantizer("hqq")
    with pytest.raises(OmniedgeError, match="already quantized"):
        refuse_quantized({"omniedge_quantization": {"bits": 4}})
    with pytest.raises(OmniedgeError, match="already quantized"):
        RTN().quantize(torch.zeros(4, 128, dtype=torch.uint8))
    k = 256
    small = _observe(_inputs(100, k, seed=6))
    with pytest.raises(OmniedgeError, match=r"GPTQ needs at least 256") as err:
        GPTQ().quantize(_weight(8, k), small)
    assert "saw 100" in str(err.value)
    GPTQ(min_rows=64).quantize(_weight(8, k), small)  # a lower minimum asked for explicitly


# ---------------------------------------------------------------- the two verbs and the folds


def test_two_verbs_round_trip_into_float_parameters() -> None:
    params = {"a.weight": _weight(16, 128).clone(), "b.gate_up_proj": _weight(2, 16, 128, seed=3).clone()}
    x = _inputs(300, 128, seed=7)
    stats = {"a.weight": _observe(x), "b.gate_up_proj": _observe(x, expert_rows=[200, 100])}
    tensors, report = create_quantized_state_dict(GPTQ(group_size=64, min_rows=128), params, stats)
    assert report["b.gate_up_proj"]["fallback_experts"] == 1
    assert 0 < report["a.weight"]["relative_output_error"] < 0.05
    convert_for_runtime(params, tensors)
    for name, p in params.items():
        want = int4.dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], 128)
        assert torch.equal(p, want)


def test_observer_samples_are_rows_it_saw() -> None:
    x = torch.arange(50 * 4, dtype=torch.float32).reshape(50, 4)
    obs = InputObserver(4, 2, samples=8)
    obs.add(x[:30], 0)
    obs.add(x[30:], 0)
    obs.add(x[:3], 1)
    st = obs.stats()
    assert st.rows.tolist() == [50, 3]
    assert {tuple(r) for r in st.samples[0].tolist()} <= {tuple(r) for r in x.tolist()}
    assert len({tuple(r) for r in st.samples[0].tolist()}) == 8
    assert st.samples[1, :3].abs().sum() > 0 and st.samples[1, 3:].abs().sum() == 0
    torch.testing.assert_close(st.abs_sum[0], x.abs().sum(0))


def test_awq_folds_leave_the_float_model_unchanged() -> None:
    """Scales folded where the AWQ table says (norms, router, v_proj rows, up rows) change no output."""
    from omniedge.models.family import thinker_parts
    from omniedge.models.tiny import build_tiny

    model, _ = build_tiny(0)
    parts = thinker_parts(model)
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = parts.thinker(input_ids=ids).logits
    g = torch.Generator().manual_seed(1)
    for layer in parts.text_model.layers:
        attn, experts = layer.self_attn, layer.mlp.experts
        h = layer.input_layernorm.weight.shape[0]
        nh, nkv, hd = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
        rand = lambda *shape: torch.rand(*shape, generator=g) + 0.5  # noqa: E731
        awq_mod.fold_into_layer(layer, "attn_in", rand(h))
        tie = awq_mod.tie_kv_heads(nh, nkv, hd)
        awq_mod.fold_into_layer(layer, "attn_out", tie(rand(nh * hd)))
        awq_mod.fold_into_layer(layer, "moe_in", rand(h))
        awq_mod.fold_into_layer(layer, "expert_mid", rand(*experts.down_proj.shape[::2]))
    with torch.no_grad():
        after = parts.thinker(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="tied"):
        awq_mod.fold_into_layer(parts.text_model.layers[0], "attn_out", rand(nh * hd))


def test_only_awq_scales_inputs() -> None:
    stats = _observe(_inputs(64, 128, seed=9), expert_rows=[32, 32])
    w = _weight(2, 16, 128)
    for q in (RTN(), GPTQ()):
        assert q.input_scale([w], stats, per_expert=True) is None


def test_linears_sharing_an_input_quantize_together_as_one_by_one() -> None:
    x = _inputs(400, 128, seed=8)
    stats = _observe(x)
    ws = [_weight(32, 128, seed=1), _weight(8, 128, seed=2), _weight(8, 128, seed=3)]
    for q in (GPTQ(group_size=64, symmetric=False), AWQ(group_size=64)):
        together = q.quantize_together(ws, stats)
        for w, p in zip(ws, together, strict=True):
            alone = q.quantize(w, stats)
            assert torch.equal(p.qweight, alone.qweight) and torch.equal(p.scales, alone.scales)
            assert (p.zero_points is None) == (alone.zero_points is None)
            if p.zero_points is not None:
                assert torch.equal(p.zero_points, alone.zero_points)
