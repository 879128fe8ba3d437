"""Expert saliency: one MoE layer's calibration statistics (moe.LayerStats) in, one score per expert out
(higher = keep).

Every saliency is a function of the routing sums (`moe.Sums`: tokens, routed counts, router mass,
REAP's router-weighted output norms), so new ones plug in with `register_saliency` without touching
the pipeline. Scores are per modality first; `scores` combines them (see its weighting).

| name          | score of expert j                                                                   |
|---------------|-------------------------------------------------------------------------------------|
| `frequency`   | counts / (tokens x top_k): its share of the routed slots                            |
| `router_mass` | router_mass / tokens: mean routing weight g_j(x) per token                           |
| `reap`        | reap_sum / counts: mean over the tokens routed to j of g_j(x) ||expert_j(x)||_2       |
| `contribution`| reap_sum / tokens: mean over all tokens of g_j(x) ||expert_j(x)||_2 (0 where j is not |
|               | routed) = reap x frequency x top_k: the expected norm of what j adds to the output    |
| `random`      | seeded uniform scores (seed and layer index), the control                           |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from omniedge.compress.moe import LayerStats, Sums
from omniedge.errors import OmniedgeError
from omniedge.models.family import MODALITIES

ScoreFn = Callable[[Sums], torch.Tensor]  # Sums with any leading shape -> scores [..., E]


def frequency(s: Sums) -> torch.Tensor:
    """Share of the routed top-k slots that went to expert j."""
    return s.counts.double() / (s.tokens.double() * s.top_k).clamp_min(1).unsqueeze(-1)


def router_mass(s: Sums) -> torch.Tensor:
    """Mean routing weight per token (the expert's share of the layer's mixing weights)."""
    return s.router_mass / s.tokens.double().clamp_min(1).unsqueeze(-1)


def reap(s: Sums) -> torch.Tensor:
    """REAP: mean over the tokens routed to j of g_j(x) * ||expert_j(x)||_2 (0 for an expert never routed)."""
    return s.reap_sum / s.counts.double().clamp_min(1)


def contribution(s: Sums) -> torch.Tensor:
    """Mean over every token of g_j(x) * ||expert_j(x)||_2, counting 0 where j was not routed: REAP's
    numerator per token, so an expert's score grows with how often it is used as well as how much."""
    return s.reap_sum / s.tokens.double().clamp_min(1).unsqueeze(-1)


SALIENCIES: dict[str, ScoreFn] = {
    "frequency": frequency,
    "router_mass": router_mass,
    "reap": reap,
    "contribution": contribution,
}
RANDOM = "random"  # the seeded control: uniform scores, independent of the statistics
WEIGHTINGS = ("modality", "token", "max")


def register_saliency(name: str, fn: ScoreFn) -> None:
    """Make a saliency selectable as a prune stage's `method`."""
    SALIENCIES[name] = fn


def methods() -> list[str]:
    return sorted([*SALIENCIES, RANDOM])


def _fn(method: str) -> ScoreFn:
    if method not in SALIENCIES:
        raise OmniedgeError(f"unknown saliency {method!r}", f"use one of {methods()} as prune.method")
    return SALIENCIES[method]


def _random(stats: LayerStats, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stats.layer)
    return torch.rand(stats.num_experts, generator=g, dtype=torch.float64)


def modality_scores(stats: LayerStats, method: str) -> dict[str, torch.Tensor]:
    """{modality: scores [E]} for the modalities calibration reached (for reports)."""
    if method == RANDOM:
        return {}
    per = _fn(method)(stats.per_modality())
    return {m: per[i] for i, m in enumerate(MODALITIES) if int(stats.tokens[i]) > 0}


def check_weighting(weighting: object) -> str | dict[str, float]:
    """A prune stage's `weighting`: `modality`, `token`, or {modality: weight >= 0} with some weight > 0."""
    if isinstance(weighting, str) and weighting in WEIGHTINGS:
        return weighting
    if isinstance(weighting, Mapping):
        unknown = sorted(set(weighting) - set(MODALITIES))
        bad = [
            m for m, w in weighting.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
        ]
        if not unknown and not bad and any(w > 0 for w in weighting.values()):
            return {str(m): float(w) for m, w in weighting.items()}
    raise OmniedgeError(
        f"saliency weighting {weighting!r} is not supported",
        f"use one of {list(WEIGHTINGS)}, or a mapping {{modality: weight}} over {list(MODALITIES)}",
    )


def scores(
    stats: LayerStats, method: str, weighting: str | Mapping[str, float] = "modality", seed: int = 0
) -> torch.Tensor:
    """Scores [E] (float64, CPU) of one layer; higher = keep.

    weighting: `token` pools every token (REAP as published); `modality` gives each modality calibration
    reached an equal vote, each modality's scores first normalised to sum to 1 so one with many tokens
    or larger activations does not drown the others; `max` keeps an expert as high as the modality that
    needs it most (each modality's normalised scores, the largest of them: an expert one modality relies on
    is not outvoted by the others); a mapping {modality: weight} votes with those weights (every modality
    it weights must have been seen)."""
    if method == RANDOM:
        return _random(stats, seed)
    fn = _fn(method)
    if int(stats.tokens.sum()) == 0:
        raise OmniedgeError(
            f"layer {stats.layer}: calibration reached it with no tokens", "give calibration.samples > 0"
        )
    if weighting == "token":
        return fn(stats.pooled()).cpu()
    seen = {m: i for i, m in enumerate(MODALITIES) if int(stats.tokens[i]) > 0}
    if weighting in ("modality", "max"):
        votes = dict.fromkeys(seen, 1.0)
    else:
        votes = {m: float(w) for m, w in check_weighting(weighting).items() if w > 0}  # type: ignore[union-attr]
        missing = sorted(m for m in votes if m not in seen)
        if missing:
            raise OmniedgeError(
                f"saliency weighting {dict(votes)} asks for modalities calibration never saw: {missing}",
                f"weight only {sorted(seen)}, or calibrate on the missing modality",
            )
    per = fn(stats.per_modality()).cpu()
    tiny = torch.finfo(torch.float64).tiny
    if weighting == "max":
        shares = [per[seen[m]] / per[seen[m]].sum().clamp_min(tiny) for m in votes]
        return torch.stack(shares).amax(dim=0).to(torch.float64)
    total = sum(votes.values())
    out = torch.zeros(stats.num_experts, dtype=torch.float64)
    for m, w in votes.items():
        row = per[seen[m]]
        out += (w / total) * row / row.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return out
