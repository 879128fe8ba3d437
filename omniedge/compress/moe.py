"""Qwen3-Omni's sparse MoE block computed over a whole batch of tokens at once, with the statistics that
expert pruning and calibrated quantizers need collected on the way.

The arithmetic is transformers' own (router: linear, float softmax, top-k, renormalise, cast back; experts:
one gather + two linears per expert, outputs weighted and `index_add_`-ed in expert order), so a layer run
here and the same layer run by transformers agree. Tokens are grouped by expert with one sort instead of
transformers' [tokens, k, experts] one-hot mask, so hundreds of thousands of calibration tokens pass in one
call. No Python loop runs over tokens; one runs over experts.

`LayerStats` is the one record of what calibration saw of one MoE layer's routing; every saliency
(omniedge.compress.saliency) and the reports are functions of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class Sums(NamedTuple):
    """Routing sums with any leading shape: [3] / [3, E] per modality, or [] / [E] pooled."""

    tokens: torch.Tensor  # token positions that reached the layer
    counts: torch.Tensor  # times expert j was among a token's top-k
    router_mass: torch.Tensor  # sum of g_j(x) over those tokens
    reap_sum: torch.Tensor  # sum of g_j(x) * ||expert_j(x)||_2 over those tokens
    top_k: int


@dataclass
class LayerStats:
    """Calibration statistics of one MoE layer, per modality (rows: text, image, audio) and expert.

    g_j(x) is the weight the model multiplies expert j's output by: for Qwen3-Omni (`norm_topk_prob`) the
    top-k softmax probabilities renormalised to sum to 1, so g_j(x) ||expert_j(x)|| is exactly the norm of
    expert j's contribution to the layer output. CPU tensors, int64 / float64.
    """

    layer: int
    num_experts: int
    top_k: int
    counts: torch.Tensor  # [3, E] tokens routed to the expert (it was in their top-k)
    router_mass: torch.Tensor  # [3, E] summed g_j(x) of those tokens
    reap_sum: torch.Tensor  # [3, E] summed g_j(x) * ||expert_j(x)||_2 (REAP's numerator)
    norm_sum: torch.Tensor  # [3, E] summed ||expert_j(x)||_2
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))  # [3]

    FIELDS = ("counts", "router_mass", "reap_sum", "norm_sum", "tokens")

    @classmethod
    def empty(cls, layer: int, num_experts: int, top_k: int) -> LayerStats:
        def z(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(3, num_experts, dtype=dtype)

        f64 = torch.float64
        return cls(layer, num_experts, top_k, z(torch.int64), z(f64), z(f64), z(f64))

    def update(
        self, modality: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor
    ) -> None:
        """Add one batch of T token positions: modality [T] (0 text, 1 image, 2 audio), the router's top-k
        experts [T, k] and weights g [T, k], and ||expert(x)||_2 of each chosen expert [T, k]; one
        scatter-add per sum, no loops."""
        if not experts.shape == weights.shape == norms.shape or experts.shape[0] != modality.shape[0]:
            raise ValueError(
                f"shapes disagree: modality {tuple(modality.shape)}, experts {tuple(experts.shape)}, "
                f"weights {tuple(weights.shape)}, norms {tuple(norms.shape)}"
            )
        e = self.num_experts
        mod = modality.long().to(experts.device)
        key = (mod[:, None] * e + experts.long()).reshape(-1)
        w, n = weights.double().reshape(-1), norms.double().reshape(-1)

        def summed(values: torch.Tensor) -> torch.Tensor:
            acc = torch.zeros(3 * e, dtype=torch.float64, device=key.device)
            return acc.index_add_(0, key, values).view(3, e).cpu()

        self.tokens += torch.bincount(mod, minlength=3).cpu()
        self.counts += torch.bincount(key, minlength=3 * e).view(3, e).cpu()
        self.router_mass += summed(w)
        self.reap_sum += summed(w * n)
        self.norm_sum += summed(n)

    def merged(self, other: LayerStats) -> LayerStats:
        """The sums of two passes over different calibration data (same layer and experts)."""
        if (self.layer, self.num_experts, self.top_k) != (other.layer, other.num_experts, other.top_k):
            raise ValueError("can only merge statistics of the same layer, experts and top-k")
        out = LayerStats.empty(self.layer, self.num_experts, self.top_k)
        for f in self.FIELDS:
            setattr(out, f, getattr(self, f) + getattr(other, f))
        return out

    def per_modality(self) -> Sums:
        return Sums(self.tokens, self.counts, self.router_mass, self.reap_sum, self.top_k)

    def pooled(self) -> Sums:
        return Sums(
            self.tokens.sum(0), self.counts.sum(0), self.router_mass.sum(0), self.reap_sum.sum(0), self.top_k
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("layer", "num_experts", "top_k", *self.FIELDS)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStats:
        return cls(**d)


def topk_route(logits: torch.Tensor, top_k: int, normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Omni's router on logits [T, E] (Qwen3OmniMoeThinkerTextTopKRouter): float softmax over the
    experts that exist -> top-k -> renormalise the k probabilities to sum to 1 (`norm_topk_prob`).
    Returns (weights [T, k] float32, experts [T, k]).

    After pruning the softmax runs over the kept experts only; renormalisation cancels its denominator,
    so a token whose top-k all survive keeps its experts and weights, and one that lost an expert gets
    the next-best kept one. Without renormalisation every token's weights change."""
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if normalise:
        top /= top.sum(dim=-1, keepdim=True)
    return top, idx


@dataclass
class Routing:
    """Which experts each token went to, grouped by expert (the order every per-expert step uses)."""

    weights: torch.Tensor  # [T, k] router weights, in the hidden dtype (as transformers casts them)
    indices: torch.Tensor  # [T, k] expert ids
    token: torch.Tensor  # [T*k] token of each (token, slot) pair, sorted by expert
    slot: torch.Tensor  # [T*k] its top-k slot
    counts: list[int]  # pairs per expert

    def spans(self) -> list[tuple[int, int, int]]:
        """(expert, start, end) into `token` / `slot` for every expert that got at least one token."""
        out, start = [], 0
        for e, c in enumerate(self.counts):
            if c:
                out.append((e, start, start + c))
            start += c
        return out

    def tokens_of(self, expert: int) -> torch.Tensor:
        """The tokens routed to `expert` (ascending)."""
        start = sum(self.counts[:expert])
        return self.token[start : start + self.counts[expert]]


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalise: bool) -> Routing:
    """The router over tokens x [T, H], grouped by expert."""
    logits = F.linear(x, gate_weight)
    top, idx = topk_route(logits, top_k, normalise)
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=gate_weight.shape[0]).tolist()
    return Routing(top.to(logits.dtype), idx, order // top_k, order % top_k, counts)


def moe_forward(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalise: bool,
    act: Callable[[torch.Tensor], torch.Tensor],
    stats: LayerStats | None = None,
    modality: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE block's output for tokens x [T, H] (gate_up [E, 2I, H] gate rows first, down [E, H, I]).

    With `stats` (and `modality` [T]: 0 text, 1 image, 2 audio) the routing statistics are added to it."""
    r = route(x, gate_weight, top_k, normalise)
    out = torch.zeros_like(x)
    norms = torch.zeros(r.indices.shape, dtype=torch.float32, device=x.device) if stats is not None else None
    for e, a, b in r.spans():
        tok, slot = r.token[a:b], r.slot[a:b]
        g, u = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(act(g) * u, down[e])
        if norms is not None:
            norms[tok, slot] = y.float().norm(dim=-1)
        out.index_add_(0, tok, (y * r.weights[tok, slot, None]).to(out.dtype))
    if stats is not None:
        assert modality is not None and norms is not None
        stats.update(modality.to(x.device), r.indices, r.weights, norms)
    return out
