"""Qwen3-Omni's sparse MoE block computed over a whole batch of tokens at once, with the statistics that
expert pruning and calibrated quantizers need collected on the way.

The arithmetic is transformers' own (router: linear, float softmax, top-k, renormalise, cast back; experts:
one gather + two linears per expert, outputs weighted and `index_add_`-ed in expert order), so a layer run
here and the same layer run by transformers agree. Tokens are grouped by expert with one sort instead of
transformers' [tokens, k, experts] one-hot mask, so hundreds of thousands of calibration tokens pass in one
call. No Python loop runs over tokens; one runs over experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

MODALITIES = ("text", "image", "audio")


@dataclass
class LayerStats:
    """Calibration statistics of one MoE layer, per modality (rows: text, image, audio) and expert.

    counts: tokens routed to the expert (it was in their top-k); weight: summed router weight of those
    tokens; reap: summed router weight x ||expert output||_2 (REAP's saliency numerator); norm: summed
    ||expert output||_2; tokens: token positions seen per modality. float64 / int64, on the CPU.
    """

    layer: int
    num_experts: int
    top_k: int
    counts: torch.Tensor  # [3, E] int64
    weight: torch.Tensor  # [3, E] float64
    reap: torch.Tensor  # [3, E] float64
    norm: torch.Tensor  # [3, E] float64
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))  # [3]

    @classmethod
    def empty(cls, layer: int, num_experts: int, top_k: int) -> LayerStats:
        def z(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(3, num_experts, dtype=dtype)

        return cls(
            layer, num_experts, top_k, z(torch.int64), z(torch.float64), z(torch.float64), z(torch.float64)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("layer", "num_experts", "top_k", "counts", "weight", "reap", "norm", "tokens")
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStats:
        return cls(**d)


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


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalise: bool) -> Routing:
    """Qwen3-Omni's router (Qwen3OmniMoeThinkerTextTopKRouter) over tokens x [T, H]."""
    logits = F.linear(x, gate_weight)
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if normalise:
        top /= top.sum(dim=-1, keepdim=True)
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
    on_expert: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The MoE block's output for tokens x [T, H] (gate_up [E, 2I, H] gate rows first, down [E, H, I]).

    With `stats` (and `modality` [T]: 0 text, 1 image, 2 audio) the routing statistics are added to it.
    `on_expert(e, token_ids, x_e, act_e)` sees each expert's routed tokens, its input rows and the
    activations that reach its down projection (what GPTQ/AWQ-style quantizers calibrate on).
    """
    r = route(x, gate_weight, top_k, normalise)
    out = torch.zeros_like(x)
    want_norms = stats is not None
    norms = torch.empty(r.token.shape[0], dtype=torch.float32, device=x.device) if want_norms else None
    for e, a, b in r.spans():
        tok, slot = r.token[a:b], r.slot[a:b]
        h = x[tok]
        g, u = F.linear(h, gate_up[e]).chunk(2, dim=-1)
        mid = act(g) * u
        y = F.linear(mid, down[e])
        if norms is not None:
            norms[a:b] = y.float().norm(dim=-1)
        if on_expert is not None:
            on_expert(e, tok, h, mid)
        out.index_add_(0, tok, (y * r.weights[tok, slot, None]).to(out.dtype))
    if stats is not None:
        assert modality is not None and norms is not None
        _accumulate(stats, r, norms, modality.to(x.device))
    return out


def _accumulate(stats: LayerStats, r: Routing, norms: torch.Tensor, modality: torch.Tensor) -> None:
    """Add one batch's routing to `stats` with scatter-adds keyed by (modality, expert): no loops."""
    e_count = stats.num_experts
    expert = r.indices[r.token, r.slot]
    key = modality[r.token] * e_count + expert
    w = r.weights[r.token, r.slot].double()
    n = norms.double()

    def summed(values: torch.Tensor | None) -> torch.Tensor:
        if values is None:
            return torch.bincount(key, minlength=3 * e_count).view(3, e_count).cpu()
        acc = torch.zeros(3 * e_count, dtype=torch.float64, device=key.device)
        return acc.index_add_(0, key, values).view(3, e_count).cpu()

    stats.counts += summed(None)
    stats.weight += summed(w)
    stats.reap += summed(w * n)
    stats.norm += summed(n)
    stats.tokens += torch.bincount(modality, minlength=3).cpu()
