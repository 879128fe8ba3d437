"""Expert saliency (frequency, router mass, REAP, random) and budgets, on transformers' real MoE block,
with the statistics the compression pass collects (moe.moe_forward -> moe.LayerStats)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from omniedge.compress import budget
from omniedge.compress.layer_inputs import LayerInputs, Want
from omniedge.compress.moe import LayerStats, moe_forward, topk_route
from omniedge.compress.prune import prune_block
from omniedge.compress.saliency import modality_scores, scores
from omniedge.errors import OmniedgeError

TEXT, IMAGE, AUDIO = 0, 1, 2


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    from omniedge.models.tiny import build_tiny

    return build_tiny(0)[0]


def _block(model: Any, layer: int = 0) -> Any:
    import copy

    from omniedge.models.family import moe_blocks

    return copy.deepcopy(moe_blocks(model)[layer][1])


def _observe(block: Any, x: torch.Tensor, modality: torch.Tensor | None = None, layer: int = 0) -> LayerStats:
    """LayerStats of the block's router and experts on x [T, H], through the compression pass's MoE."""
    e, k = block.gate.weight.shape[0], block.gate.top_k
    stats = LayerStats.empty(layer, e, k)
    mod = torch.zeros(x.shape[0], dtype=torch.long) if modality is None else modality
    ex = block.experts
    with torch.no_grad():
        out = moe_forward(
            x, block.gate.weight, ex.gate_up_proj, ex.down_proj, k, True, ex.act_fn, stats=stats, modality=mod
        )
        torch.testing.assert_close(out, block(x[None])[0], rtol=1e-5, atol=1e-6)
    return stats


# ---------------------------------------------------------------- statistics and saliencies


def test_observed_statistics_match_the_router(tiny_model: Any) -> None:
    block = _block(tiny_model)
    x = torch.randn(64, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    mod = torch.tensor([TEXT] * 40 + [AUDIO] * 24)
    stats = _observe(block, x, mod)
    with torch.no_grad():
        _, w, idx = block.gate(x)
    assert stats.tokens.tolist() == [40, 0, 24]
    assert torch.equal(stats.counts[TEXT], torch.bincount(idx[:40].flatten(), minlength=8))
    # Renormalised top-k weights: each token hands out a mass of exactly 1.
    torch.testing.assert_close(stats.router_mass.sum(-1), stats.tokens.double())
    # REAP's sum uses each routed token's true expert output norm.
    e = int(idx[0, 0])
    with torch.no_grad():
        gate, up = torch.nn.functional.linear(x[0], block.experts.gate_up_proj[e]).chunk(2)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, block.experts.down_proj[e])
    alone = LayerStats.empty(0, 8, 2)
    alone.update(torch.tensor([TEXT]), idx[:1, :1], w[:1, :1], y.norm()[None, None])
    assert float(alone.reap_sum[TEXT, e]) == pytest.approx(float(w[0, 0] * y.detach().norm()), rel=1e-6)
    assert float(stats.reap_sum[TEXT, e]) >= float(alone.reap_sum[TEXT, e])
    back = LayerStats.from_dict(stats.to_dict())
    assert torch.equal(back.merged(stats).counts, 2 * stats.counts)


def test_reap_ranks_a_strong_rare_expert_above_a_frequent_silent_one(tiny_model: Any) -> None:
    """Expert 0: rarely routed, large output. Expert 1: routed for most tokens, near-zero output.
    Frequency keeps 1 over 0; REAP keeps 0 over 1."""
    block = _block(tiny_model)
    h = block.gate.weight.shape[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, h, generator=g)
    x[:, 0] = 1.0 + 0.1 * torch.randn(400, generator=g)
    with torch.no_grad():
        block.gate.weight.copy_(0.05 * torch.randn(8, h, generator=g))
        block.gate.weight[0] = 0.0
        block.gate.weight[1, 0] = 1.5
        block.experts.gate_up_proj[0] *= 30.0
        block.experts.down_proj[0] *= 30.0
        block.experts.down_proj[1] *= 1e-3
    stats = _observe(block, x)
    counts = stats.counts.sum(0)
    assert 0 < counts[0] < counts[1] / 10  # the construction holds: rare vs frequent
    freq, rm, rp = (scores(stats, m) for m in ("frequency", "router_mass", "reap"))
    assert freq[1] > freq[0] and rm[1] > rm[0]
    assert rp[0] > rp[1]
    assert budget.select(rp, 4).count(0) == 1 and 1 not in budget.select(rp, 4)
    assert 1 in budget.select(freq, 4) and 0 not in budget.select(freq, 4)
    # contribution = what an expert adds per token on average = REAP x frequency x top-k
    contrib = scores(stats, "contribution", "token")
    torch.testing.assert_close(contrib, scores(stats, "reap", "token") * freq * stats.top_k)
    assert contrib[0] > contrib[1]


def _routed(tokens: dict[int, tuple[int, list[int]]], e: int = 8, k: int = 2) -> LayerStats:
    """Stats where modality m sends n tokens, each to the experts in its list (cycled k at a time)."""
    stats = LayerStats.empty(5, e, k)
    for m, (n, experts) in tokens.items():
        idx = torch.tensor([[experts[(t + j) % len(experts)] for j in range(k)] for t in range(n)])
        w = torch.full((n, k), 1.0 / k)
        stats.update(torch.full((n,), m), idx, w, torch.ones(n, k))
    return stats


def test_modality_weighting_protects_experts_only_audio_uses() -> None:
    stats = _routed({TEXT: (1000, [0, 1, 2, 3, 6]), AUDIO: (20, [4, 5])})
    by_token = budget.select(scores(stats, "frequency", "token"), 4)
    by_modality = budget.select(scores(stats, "frequency", "modality"), 4)
    assert 4 not in by_token and 5 not in by_token
    assert 4 in by_modality and 5 in by_modality
    weighted = scores(stats, "frequency", {"text": 1.0, "audio": 0.0})
    assert budget.select(weighted, 4) == by_token
    assert set(modality_scores(stats, "reap")) == {"text", "audio"}
    with pytest.raises(OmniedgeError, match="never saw"):
        scores(stats, "reap", {"image": 1.0})
    with pytest.raises(OmniedgeError, match="unknown saliency"):
        scores(stats, "magnitude")


def test_max_weighting_keeps_the_experts_one_modality_relies_on() -> None:
    """Text and images share experts 0-3, audio needs 4-6: the modality vote averages audio's experts
    below the shared ones and drops them all; `max` keeps each as high as the modality that needs it."""
    stats = _routed({TEXT: (1000, [0, 1, 2, 3]), IMAGE: (500, [0, 1, 2, 3]), AUDIO: (30, [4, 5, 6])})
    by_modality = set(budget.select(scores(stats, "frequency", "modality"), 4))
    by_max = set(budget.select(scores(stats, "frequency", "max"), 4))
    assert by_modality == {0, 1, 2, 3}
    assert {4, 5, 6} <= by_max


def test_random_control_is_seeded_per_layer() -> None:
    a, b = _routed({TEXT: (10, [0, 1])}), _routed({TEXT: (99, [2, 3, 4])})
    assert torch.equal(scores(a, "random", seed=7), scores(b, "random", seed=7))
    assert not torch.equal(scores(a, "random", seed=7), scores(a, "random", seed=8))
    other_layer = LayerStats.empty(6, 8, 2)
    assert not torch.equal(scores(a, "random", seed=7), scores(other_layer, "random", seed=7))


# ---------------------------------------------------------------- budgets


def test_uniform_budget() -> None:
    assert budget.uniform_budget(128, 8, 0.5) == 64
    assert budget.uniform_budget(128, 8, 0.6) == 77
    assert budget.uniform_budget(128, 8, 0.6, multiple_of=8) == 80
    assert budget.uniform_budget(32, 4, 1.0) == 32
    with pytest.raises(OmniedgeError, match="fewer than the 8 the router picks") as err:
        budget.uniform_budget(128, 8, 0.05)
    assert "keep_ratio >= 0.0625" in str(err.value)
    with pytest.raises(OmniedgeError, match="multiple_of"):
        budget.uniform_budget(100, 8, 0.5, multiple_of=8)


def test_global_budget_moves_experts_to_layers_that_spread_their_saliency() -> None:
    peaked = torch.tensor([10.0, 9.0, 8.0, 7.0] + [0.01] * 12)  # four experts carry the layer
    flat = torch.linspace(1.0, 0.9, 16)  # every expert matters about equally
    counts = budget.global_budget([peaked, flat], top_k=2, keep_ratio=0.5)
    assert sum(counts) == 16 and counts[0] < 8 < counts[1]
    assert min(counts) >= 2
    floored = budget.global_budget([peaked, flat], top_k=2, keep_ratio=0.5, min_keep=6)
    assert floored[0] == 6 and sum(floored) == 16
    peaked32 = torch.cat((peaked[:4], torch.full((28,), 0.01)))
    flat32 = torch.linspace(1.0, 0.9, 32)
    by8 = budget.global_budget([peaked32, flat32, flat32, peaked32], top_k=2, keep_ratio=0.5, multiple_of=8)
    assert all(c % 8 == 0 for c in by8) and sum(by8) == 64
    assert by8[0] == by8[3] == 8 and by8[1] == by8[2] == 24
    with pytest.raises(OmniedgeError, match="fewer than the 4 the router picks"):
        budget.global_budget([flat, flat], top_k=4, keep_ratio=0.5, min_keep=2)
    with pytest.raises(OmniedgeError, match="per-layer floor"):
        budget.global_budget([flat, flat], top_k=4, keep_ratio=0.2)


def test_router_renormalisation_after_pruning() -> None:
    """Renormalised top-k: tokens whose experts all survive keep their weights exactly; without it every
    token's weights change."""
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(4))
    kept = [0, 2, 3, 5, 6, 7]
    w, idx = topk_route(logits, 2)
    w_p, idx_p = topk_route(logits[:, kept], 2)
    untouched = torch.isin(idx, torch.tensor(kept)).all(-1)
    assert 0 < int(untouched.sum()) < 200
    assert torch.equal(torch.tensor(kept)[idx_p][untouched], idx[untouched])
    torch.testing.assert_close(w_p[untouched], w[untouched], rtol=1e-6, atol=1e-7)
    w_raw, _ = topk_route(logits, 2, normalise=False)
    w_raw_p, _ = topk_route(logits[:, kept], 2, normalise=False)
    assert not torch.allclose(w_raw_p[untouched], w_raw[untouched])
    assert budget.router_config(True) == {"norm_topk_prob": True}


# ---------------------------------------------------------------- exactness on the real block


def test_keeping_every_expert_changes_nothing(tiny_model: Any) -> None:
    block = _block(tiny_model)
    x = torch.randn(32, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(5))
    stats = _observe(block, x)
    with torch.no_grad():
        before = block(x[None])
    keep = budget.uniform_budget(stats.num_experts, stats.top_k, 1.0)
    prune_block(block, budget.select(scores(stats, "reap"), keep))
    with torch.no_grad():
        assert torch.equal(block(x[None]), before)


def test_pruning_experts_no_token_reaches_leaves_outputs_unchanged(tiny_model: Any) -> None:
    block = _block(tiny_model)
    h = block.gate.weight.shape[1]
    x = torch.randn(3, h, generator=torch.Generator().manual_seed(6))  # 3 tokens reach at most 6 experts
    other = torch.randn(64, h, generator=torch.Generator().manual_seed(7))
    stats = _observe(block, x)
    used = int((stats.counts.sum(0) > 0).sum())
    assert used < stats.num_experts
    with torch.no_grad():
        before, before_other = block(x[None]), block(other[None])
    kept = budget.select(scores(stats, "frequency"), used)
    assert budget.routed_share_kept(stats.counts, kept)[TEXT] == 1.0
    prune_block(block, kept)
    with torch.no_grad():
        torch.testing.assert_close(block(x[None]), before, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(block(other[None]), before_other)  # inputs that needed them do change


def test_quantizer_inputs_are_the_tokens_routed_to_each_expert(tiny_model: Any) -> None:
    """What a calibrated quantizer sees of fused experts: per expert, only the rows of the tokens the
    block's router sends to it (gate_up: the MoE input; down: act(gate) * up of those rows)."""
    block = _block(tiny_model)
    e, h = block.gate.weight.shape
    x = torch.randn(40, h, generator=torch.Generator().manual_seed(8))
    inputs = LayerInputs()
    inputs.add_moe(x, torch.zeros_like(x), torch.zeros(len(x)))  # output, modality: not read by quantizers
    gate_up, down = inputs.experts(block, block.gate.top_k, True, Want(hessian=True, samples=64))
    with torch.no_grad():
        _, _, idx = block.gate(x)
    counts = torch.bincount(idx.flatten(), minlength=e)
    assert torch.equal(gate_up.rows, counts) and torch.equal(down.rows, counts)
    j = int(idx[0, 0])
    routed = (idx == j).any(-1)
    torch.testing.assert_close(gate_up.abs_sum[j], x[routed].abs().sum(0))
    torch.testing.assert_close(gate_up.hessian[j], x[routed].T @ x[routed], rtol=1e-5, atol=1e-5)
    g, u = torch.nn.functional.linear(x[routed], block.experts.gate_up_proj[j]).chunk(2, dim=-1)
    mid = block.experts.act_fn(g) * u
    torch.testing.assert_close(down.abs_sum[j], mid.abs().sum(0).detach(), rtol=1e-5, atol=1e-6)
    assert int((gate_up.samples[j].abs().sum(-1) > 0).sum()) == int(counts[j])
