"""Expert saliency: per-layer routing statistics in, one score per expert out (higher = keep).

`ExpertStats` is what the layer-by-layer calibration pass fills for one MoE layer, per modality
(text, image, audio): how many tokens of each modality reached the layer, how often each expert was in a
token's top-k, the routing weight it received, and REAP's router-weighted output norm. Every saliency is
a function of those sums, so new ones plug in with `register_saliency` without touching the pipeline.

Routing weight g_j(x) means the weight the model multiplies expert j's output by: for Qwen3-Omni
(`norm_topk_prob: true`) the top-k softmax probabilities renormalised to sum to 1. REAP's reference code
calls this `renormalize_router_weights=True`; with it, g_j(x) * ||expert_j(x)|| is exactly the norm of
expert j's contribution to the layer output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

from omniedge.compress.calibration import MODALITIES  # row order of every [M, E] tensor
from omniedge.errors import OmniedgeError


class Sums(NamedTuple):
    """Routing sums with any leading shape: [M] / [M, E] per modality, or [] / [E] pooled."""

    tokens: torch.Tensor  # token positions that reached the layer
    counts: torch.Tensor  # times expert j was among a token's top-k
    router_mass: torch.Tensor  # sum of g_j(x) over those tokens
    reap_sum: torch.Tensor  # sum of g_j(x) * ||expert_j(x)||_2 over those tokens
    top_k: int


@dataclass
class ExpertStats:
    """Routing statistics of one MoE layer, per modality. M = len(modalities), E = experts."""

    layer: int  # the decoder layer index (also seeds the random control)
    top_k: int
    tokens: torch.Tensor  # [M] int64
    counts: torch.Tensor  # [M, E] int64
    router_mass: torch.Tensor  # [M, E] float64
    reap_sum: torch.Tensor  # [M, E] float64
    norm_sum: torch.Tensor  # [M, E] float64: sum of ||expert_j(x)||_2 (for reports: mean output norm)
    modalities: tuple[str, ...] = MODALITIES

    @classmethod
    def empty(
        cls,
        layer: int,
        num_experts: int,
        top_k: int,
        modalities: tuple[str, ...] = MODALITIES,
        device: torch.device | str | None = None,
    ) -> ExpertStats:
        m = len(modalities)

        def zeros(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        i64, f64 = torch.int64, torch.float64
        return cls(
            layer,
            top_k,
            zeros(i64, m),
            zeros(i64, m, num_experts),
            zeros(f64, m, num_experts),
            zeros(f64, m, num_experts),
            zeros(f64, m, num_experts),
            tuple(modalities),
        )

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[-1])

    def update(
        self,
        modality: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        out_norms: torch.Tensor,
    ) -> None:
        """Add one batch of T token positions: modality [T] (index into `modalities`), the router's
        top-k experts [T, k] and weights [T, k], and ||expert_j(x)||_2 of each chosen expert [T, k]."""
        m, e = self.counts.shape
        dev = self.counts.device
        mod = modality.to(dev, torch.int64)
        idx = top_k_index.to(dev, torch.int64)
        if idx.shape != top_k_weights.shape or idx.shape != out_norms.shape or idx.shape[0] != mod.shape[0]:
            raise ValueError(
                f"shapes disagree: modality {tuple(mod.shape)}, top-k index {tuple(idx.shape)}, "
                f"weights {tuple(top_k_weights.shape)}, norms {tuple(out_norms.shape)}"
            )
        flat = (mod[:, None] * e + idx).reshape(-1)
        w = top_k_weights.to(dev, torch.float64).reshape(-1)
        n = out_norms.to(dev, torch.float64).reshape(-1)
        self.tokens += torch.bincount(mod, minlength=m)
        self.counts += torch.bincount(flat, minlength=m * e).view(m, e)
        self.router_mass.view(-1).index_add_(0, flat, w)
        self.reap_sum.view(-1).index_add_(0, flat, w * n)
        self.norm_sum.view(-1).index_add_(0, flat, n)

    def merged(self, other: ExpertStats) -> ExpertStats:
        """The sums of two passes over different calibration data (same layer and experts)."""
        if (self.layer, self.top_k, self.modalities) != (other.layer, other.top_k, other.modalities):
            raise ValueError("can only merge statistics of the same layer, top-k and modalities")
        out = ExpertStats.empty(self.layer, self.num_experts, self.top_k, self.modalities, self.counts.device)
        for f in ("tokens", "counts", "router_mass", "reap_sum", "norm_sum"):
            getattr(out, f).copy_(getattr(self, f) + getattr(other, f).to(self.counts.device))
        return out

    def per_modality(self) -> Sums:
        return Sums(self.tokens, self.counts, self.router_mass, self.reap_sum, self.top_k)

    def pooled(self) -> Sums:
        return Sums(
            self.tokens.sum(0), self.counts.sum(0), self.router_mass.sum(0), self.reap_sum.sum(0), self.top_k
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (CPU), for storing beside the checkpoint."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.cpu() if isinstance(v, torch.Tensor) else (list(v) if f.name == "modalities" else v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpertStats:
        return cls(**{**d, "modalities": tuple(d.get("modalities", MODALITIES))})


# ---------------------------------------------------------------- saliencies
# A score function maps Sums (any leading shape) to scores [..., E]; higher = keep.

ScoreFn = Callable[[Sums], torch.Tensor]


def frequency(s: Sums) -> torch.Tensor:
    """Share of the routed top-k slots that went to expert j."""
    return s.counts.double() / (s.tokens.double() * s.top_k).clamp_min(1).unsqueeze(-1)


def router_mass(s: Sums) -> torch.Tensor:
    """Mean routing weight per token (the expert's share of the layer's mixing weights)."""
    return s.router_mass / s.tokens.double().clamp_min(1).unsqueeze(-1)


def reap(s: Sums) -> torch.Tensor:
    """REAP: mean over the tokens routed to j of g_j(x) * ||expert_j(x)||_2 (0 for an expert never routed)."""
    return s.reap_sum / s.counts.double().clamp_min(1)


SALIENCIES: dict[str, ScoreFn] = {"frequency": frequency, "router_mass": router_mass, "reap": reap}
RANDOM = "random"  # the seeded control: uniform scores, independent of the statistics


def register_saliency(name: str, fn: ScoreFn) -> None:
    """Make a saliency selectable by name (a recipe's `prune.method`)."""
    SALIENCIES[name] = fn


def _random(stats: ExpertStats, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stats.layer)
    return torch.rand(stats.num_experts, generator=g, dtype=torch.float64)


def _fn(method: str) -> ScoreFn:
    if method not in SALIENCIES:
        raise OmniedgeError(
            f"unknown saliency {method!r}", f"use one of {sorted([*SALIENCIES, RANDOM])} as prune.method"
        )
    return SALIENCIES[method]


def modality_scores(stats: ExpertStats, method: str) -> dict[str, torch.Tensor]:
    """{modality: scores [E]} for the modalities calibration reached (for reports)."""
    per = _fn(method)(stats.per_modality())
    return {m: per[i] for i, m in enumerate(stats.modalities) if int(stats.tokens[i]) > 0}


def scores(
    stats: ExpertStats, method: str, weighting: str | Mapping[str, float] = "modality", seed: int = 0
) -> torch.Tensor:
    """Scores [E] (float64, CPU) of one layer; higher = keep.

    weighting: `token` pools every token (REAP as published); `modality` gives each modality the
    calibration reached an equal vote, each modality's scores first normalised to sum to 1 so one with
    many tokens or larger activations does not drown the others; a mapping {modality: weight} votes with
    those weights (every modality it names must have been seen)."""
    if method == RANDOM:
        return _random(stats, seed)
    fn = _fn(method)
    if stats.tokens.sum() == 0:
        raise OmniedgeError(
            f"layer {stats.layer}: calibration reached it with no tokens", "give calibration samples > 0"
        )
    if weighting == "token":
        return fn(stats.pooled()).cpu()
    seen = {m: i for i, m in enumerate(stats.modalities) if int(stats.tokens[i]) > 0}
    if weighting == "modality":
        votes = dict.fromkeys(seen, 1.0)
    elif isinstance(weighting, Mapping):
        unknown = sorted(set(weighting) - set(stats.modalities))
        missing = sorted(m for m, w in weighting.items() if w > 0 and m not in seen)
        votes = {m: float(w) for m, w in weighting.items() if w > 0}
        problem = (
            f"names unknown modalities {unknown}"
            if unknown
            else f"asks for modalities calibration never saw: {missing}"
            if missing
            else "gives no modality a positive weight"
            if not votes
            else ""
        )
        if problem:
            raise OmniedgeError(
                f"saliency weighting {dict(weighting)} {problem}",
                f"weight only {sorted(seen)}, or calibrate on the missing modality",
            )
    else:
        raise OmniedgeError(
            f"unknown saliency weighting {weighting!r}", "use token, modality or {modality: weight}"
        )
    per = fn(stats.per_modality()).cpu()
    total = sum(votes.values())
    out = torch.zeros(stats.num_experts, dtype=torch.float64)
    for m, w in votes.items():
        row = per[seen[m]]
        out += (w / total) * row / row.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return out
