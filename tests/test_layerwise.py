"""Layer-by-layer compression against the whole model computed by transformers itself.

The reference here is the computation the old pipeline did: the whole teacher loaded by from_pretrained,
routers counted with hooks during transformers' own forward of every calibration request, experts pruned
in the whole model, its weights quantized. The streaming pipeline must choose the same experts and write
the same INT4 bytes, on tiny and on the trained omni-mini; its checkpoint (packed INT4 only) must reload
and generate the same greedy tokens as the old format (dequantized floats).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from omniedge.compress import budget, pipeline, saliency
from omniedge.compress.calibration import build_requests, encode_request, modality_counts
from omniedge.compress.moe import LayerStats, moe_forward
from omniedge.compress.prune import prune_block
from omniedge.compress.recipe import validate_recipe
from omniedge.int4 import dequantize, quantize
from omniedge.models.family import moe_blocks, thinker_parts
from omniedge.weights import SafetensorsDir, canonical_name

# What `targets: [attention, experts]` quantizes in every decoder layer.
TARGETS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.o_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # fmt: skip
RECIPE = {
    "stages": [{"prune": {"keep_ratio": 0.5}}, {"quantize": {}}],
    "calibration": {"samples": 12, "max_tokens": 96, "seed": 0, "image_size": 64, "audio_seconds": 1.0},
    "measure": {"texts": 3, "images": 2, "audios": 2, "max_tokens": 64},
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    h = tmp_path_factory.mktemp("omniedge-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(h))
        yield h


def _whole_model_reference(
    ckpt: Path, recipe: dict[str, Any]
) -> tuple[Any, Any, dict[int, list[int]], dict[str, Any]]:
    """(model pruned and dequantized in memory, tokenizer, kept experts per layer, packed INT4 by name)."""
    from omniedge.checkpoint import load_checkpoint

    recipe = validate_recipe(recipe)
    model, tok = load_checkpoint(ckpt)
    cal = recipe["calibration"]
    requests = build_requests(cal, modality_counts(cal["samples"], cal["mix"]), "calibration")
    encoded = [encode_request(r, tok, model, cal["max_tokens"]) for r in requests]
    cfg = thinker_parts(model).text_model.config
    stats = {
        li: LayerStats.empty(li, int(cfg.num_experts), int(cfg.num_experts_per_tok))
        for li, _ in moe_blocks(model)
    }
    current: dict[str, torch.Tensor] = {}

    def hook(li: int) -> Any:
        def fn(_m: Any, _i: Any, out: Any) -> None:
            _, w, idx = out
            st, mod = stats[li], current["modality"]
            for k in range(idx.shape[1]):
                st.counts.index_put_((mod, idx[:, k]), torch.ones_like(mod), accumulate=True)
            st.tokens += torch.bincount(mod, minlength=3)
            del w

        return fn

    handles = [b.gate.register_forward_hook(hook(li)) for li, b in moe_blocks(model)]
    with torch.inference_mode():
        for e in encoded:
            current["modality"] = e.modality
            model.thinker(**e.inputs, use_cache=False)
    for h in handles:
        h.remove()
    settings = recipe["stages"][0]["prune"]
    keep = budget.uniform_budget(int(cfg.num_experts), int(cfg.num_experts_per_tok), settings["keep_ratio"])
    kept = {
        li: budget.select(saliency.scores(stats[li], settings["method"], settings["weighting"]), keep)
        for li in stats
    }
    for li, block in moe_blocks(model):
        prune_block(block, kept[li])
    packed: dict[str, Any] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = canonical_name(name)
            if n.startswith("thinker.model.layers.") and n.endswith(TARGETS):
                packed[n] = quantize(p.data)
                p.copy_(dequantize(*packed[n], p.shape[-1]))
    return model, tok, kept, packed


def _generate(model: Any, inputs: dict[str, torch.Tensor]) -> list[int]:
    with torch.inference_mode():
        out = model.thinker.generate(**inputs, max_new_tokens=12, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", ["tiny", "omni-mini"])
def test_layer_by_layer_equals_the_whole_model(name: str, home: Path, tmp_path: Path) -> None:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.calibration import Request
    from omniedge.compress.calibration_builtin import render_shapes, synth_tone
    from omniedge.models.registry import resolve_checkpoint

    src = resolve_checkpoint(name)
    out = pipeline.compress(src, tmp_path / "out", RECIPE, progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    ref_model, tok, kept, packed = _whole_model_reference(src, RECIPE)

    # Same experts kept in every layer, from the same router statistics.
    assert meta["stages"][0]["result"]["kept"] == {str(k): v for k, v in kept.items()}
    # Same INT4 bytes and scales for every quantized weight, and nothing else quantized.
    stored = SafetensorsDir(out)
    q = json.loads((out / "config.json").read_text())["omniedge_quantization"]
    assert sorted(q["modules"]) == sorted(packed)
    for n, (qw, sc) in packed.items():
        assert torch.equal(stored.get(f"{n}.qweight"), qw), n
        assert torch.equal(stored.get(f"{n}.scales"), sc), n
    # The pruned routers are the teacher's rows of the kept experts.
    for li, block in moe_blocks(ref_model):
        assert torch.equal(stored.get(f"thinker.model.layers.{li}.mlp.gate.weight"), block.gate.weight)

    # The INT4-only checkpoint reloads (packed weights, dequantized on the fly) and generates the same greedy
    # tokens as the old format, whose model.safetensors held the dequantized floats (ref_model).
    student, _ = load_checkpoint(out)
    rng = __import__("numpy").random.default_rng(5)
    img, _ = render_shapes(64, rng)
    tone, _ = synth_tone(1.0, rng)
    for req in (
        Request("Tell me about the weather today."),
        Request("What do you see and hear?", "", img, tone),
    ):
        inputs = encode_request(req, tok, student, 128).inputs  # ends with "<|im_start|>assistant\n"
        assert _generate(student, inputs) == _generate(ref_model, inputs)


def test_router_statistics_cover_every_token(home: Path, tmp_path: Path) -> None:
    """Every calibration position put exactly top-k choices into every layer; renormalised weights sum to 1
    per position; REAP's numerator and the norm sums are consistent (reap <= norm, both > 0 where routed)."""
    from omniedge.models.registry import resolve_checkpoint

    out = pipeline.compress(resolve_checkpoint("tiny"), tmp_path / "o", RECIPE, progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    layers = [
        LayerStats.from_dict(d) for d in torch.load(out / pipeline.STATS_FILE, weights_only=True)["layers"]
    ]
    assert [s.layer for s in layers] == [0, 1]
    tokens = torch.tensor([meta["calibration"]["tokens"][m] for m in ("text", "image", "audio")])
    assert bool((tokens > 0).all())
    for s in layers:
        assert s.tokens.tolist() == tokens.tolist()
        assert s.counts.sum(-1).tolist() == (tokens * s.top_k).tolist()
        torch.testing.assert_close(s.router_mass.sum(-1), tokens.double())
        routed = s.counts > 0
        assert bool((s.norm_sum[routed] > 0).all()) and bool((s.norm_sum[~routed] == 0).all())
        assert bool((s.reap_sum <= s.norm_sum + 1e-9).all())  # router weights are <= 1


def test_batched_moe_equals_transformers_block_and_naive_statistics() -> None:
    """moe_forward gives transformers' sparse MoE block output, and its statistics equal a per-token loop."""
    from transformers import Qwen3OmniMoeConfig

    from omniedge.models.tiny import tiny_config_dict

    special = {k: 500 + i for i, k in enumerate(("audio_pad", "image_pad", "video_pad", "audio_start", "audio_end",
                                                   "vision_start", "vision_end", "user", "im_start", "im_end",
                                                   "system", "assistant"))}  # fmt: skip
    cfg = Qwen3OmniMoeConfig(**tiny_config_dict(512, special)).thinker_config.text_config
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as mq

    torch.manual_seed(0)
    block = mq.Qwen3OmniMoeThinkerTextSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(37, cfg.hidden_size)
    modality = torch.randint(0, 3, (37,))
    stats = LayerStats.empty(0, cfg.num_experts, cfg.num_experts_per_tok)
    e = block.experts
    with torch.inference_mode():
        ours = moe_forward(x, block.gate.weight, e.gate_up_proj, e.down_proj, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, e.act_fn, stats=stats, modality=modality)  # fmt: skip
        ref = block(x[None])[0]
        # float32 sums in another order (CPU kernels differ by machine): within 1e-6 of the output's scale
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        _, w, idx = block.gate(x)
        naive = LayerStats.empty(0, cfg.num_experts, cfg.num_experts_per_tok)
        for t in range(37):
            for k in range(cfg.num_experts_per_tok):
                j, m = int(idx[t, k]), int(modality[t])
                g, u = torch.nn.functional.linear(x[t], e.gate_up_proj[j]).chunk(2)
                y = torch.nn.functional.linear(e.act_fn(g) * u, e.down_proj[j])
                naive.counts[m, j] += 1
                naive.router_mass[m, j] += float(w[t, k])
                naive.norm_sum[m, j] += float(y.norm())
                naive.reap_sum[m, j] += float(w[t, k]) * float(y.norm())
    assert torch.equal(stats.counts, naive.counts)
    for f in ("router_mass", "norm_sum", "reap_sum"):
        torch.testing.assert_close(getattr(stats, f), getattr(naive, f), rtol=1e-5, atol=1e-6)
    assert stats.tokens.tolist() == torch.bincount(modality, minlength=3).tolist()


def test_calibrated_quantizer_gets_the_routed_tokens(home: Path, tmp_path: Path) -> None:
    """A quantizer gets, per kept expert, the input statistics of the tokens the pruned router sends to it:
    every expert the teacher routed a token to keeps that token (pruning only moves tokens off dropped
    experts), each token fills exactly top-k slots, and attention projections see every token."""
    from dataclasses import dataclass
    from typing import ClassVar

    from omniedge.compress import quantizers
    from omniedge.compress.quantizers import RTN
    from omniedge.models.registry import resolve_checkpoint

    seen: list[tuple[tuple[int, ...], list[int] | int]] = []

    @dataclass(frozen=True)
    class Recording(RTN):
        name: ClassVar[str] = "recording"
        needs_hessian: ClassVar[bool] = True

        def quantize(self, w: torch.Tensor, stats: Any = None) -> Any:
            assert stats is not None and stats.hessian is not None
            rows = stats.rows.tolist()
            seen.append((tuple(w.shape), rows))
            if w.dim() == 3:  # the Hessian sums x^T x over exactly those rows: its trace is sum |x|^2 > 0
                routed = stats.rows > 0
                assert bool((stats.hessian.diagonal(dim1=-2, dim2=-1).sum(-1)[routed] > 0).all())
            return super().quantize(w, None)

    quantizers.register_quantizer("recording", Recording)
    try:
        recipe = {**RECIPE, "stages": [{"prune": {"keep_ratio": 0.5}}, {"quantize": {"method": "recording"}}]}
        out = pipeline.compress(resolve_checkpoint("tiny"), tmp_path / "rec", recipe, progress=False)
        plain = pipeline.compress(resolve_checkpoint("tiny"), tmp_path / "rtn", RECIPE, progress=False)
    finally:
        del quantizers.QUANTIZERS["recording"]
    meta = json.loads((out / "omniedge.json").read_text())
    layers = [
        LayerStats.from_dict(d) for d in torch.load(out / pipeline.STATS_FILE, weights_only=True)["layers"]
    ]
    total = sum(meta["calibration"]["tokens"].values())
    per_layer = [x for x in seen if len(x[0]) == 3]
    for li, s in enumerate(layers):
        kept = meta["stages"][0]["result"]["kept"][str(li)]
        teacher = s.counts.sum(0)[kept].tolist()
        gate_up, down = per_layer[2 * li][1], per_layer[2 * li + 1][1]
        assert gate_up == down and isinstance(gate_up, list)
        assert all(a >= b for a, b in zip(gate_up, teacher, strict=True))
        assert sum(gate_up) == total * s.top_k > sum(teacher)  # some tokens moved off dropped experts
    assert all(x[1] == total for x in seen if len(x[0]) == 2)
    a, b = SafetensorsDir(out), SafetensorsDir(plain)  # same maths as RTN: same bytes
    assert all(torch.equal(a.get(n), b.get(n)) for n in b.names() if n.endswith(".qweight"))
