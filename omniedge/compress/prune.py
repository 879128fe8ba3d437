"""Expert pruning, one MoE layer at a time: score the experts from the layer's calibration statistics, keep
the same number in every layer, cut the router rows and fused expert weights.

A saliency is a function of one layer's statistics (`moe.LayerStats`: per modality and expert, routed
token counts, summed router weight, REAP's summed router weight x expert output norm, summed output norms)
and the prune settings, returning one score per expert (higher = keep). New saliencies plug in with
`register_saliency` without touching the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from omniedge.compress.moe import MODALITIES, LayerStats
from omniedge.errors import OmniedgeError

Saliency = Callable[[LayerStats, dict[str, Any]], torch.Tensor]  # -> [E] float, higher = more important


def combine_modalities(per_modality: torch.Tensor, stats: LayerStats, weighting: str) -> torch.Tensor:
    """[3, E] -> [E]. `modality`: each modality that was seen counts equally (a share of its own routed
    slots), so a few audio tokens are not drowned by many text tokens; `token`: raw sums."""
    x = per_modality.double()
    if weighting == "token":
        return x.sum(0)
    seen = stats.tokens > 0
    if not bool(seen.any()):
        raise OmniedgeError("calibration saw no tokens", "give calibration.samples > 0")
    slots = (stats.tokens.double() * stats.top_k).clamp(min=1)
    return (x / slots[:, None])[seen].mean(0)


def frequency_saliency(stats: LayerStats, settings: dict[str, Any]) -> torch.Tensor:
    """How often each expert was among the router's top-k."""
    return combine_modalities(stats.counts, stats, settings.get("weighting", "modality"))


def router_weight_saliency(stats: LayerStats, settings: dict[str, Any]) -> torch.Tensor:
    """Summed (renormalised) router weight each expert received when chosen."""
    return combine_modalities(stats.weight, stats, settings.get("weighting", "modality"))


SALIENCY: dict[str, Saliency] = {"frequency": frequency_saliency, "router_weight": router_weight_saliency}


def register_saliency(name: str, fn: Saliency) -> None:
    """Make a saliency selectable as `prune: {method: <name>}` in a recipe."""
    SALIENCY[name] = fn


def keep_count(num_experts: int, top_k: int, keep_ratio: float) -> int:
    """round(E * keep_ratio) (halves round up), refused when fewer than top-k experts would remain."""
    keep = min(num_experts, math.floor(num_experts * keep_ratio + 0.5))
    if keep < top_k:
        raise OmniedgeError(
            f"keep_ratio {keep_ratio} keeps {keep} of {num_experts} experts, fewer than the {top_k} "
            "the router picks per token",
            f"use keep_ratio >= {top_k / num_experts:.4g}",
        )
    return keep


def select_experts(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring expert indices of one layer, ascending (ties: lower index wins)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return sorted(int(i) for i in order)


def prune_block(block: Any, kept: Sequence[int]) -> None:
    """Keep the listed experts of one sparse MoE block in place (router rows, fused expert weights), in order."""
    e = int(block.gate.weight.shape[0])
    if any(not 0 <= k < e for k in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"bad expert indices {list(kept)} for {e} experts")
    idx = torch.tensor(sorted(kept), dtype=torch.long)
    for module in (block.gate, block.experts):
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] == e:
                sliced = p.data.index_select(0, idx.to(p.device)).contiguous()
                module._parameters[pname] = torch.nn.Parameter(sliced, requires_grad=False)
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)


class PruneStage:
    """`prune` recipe stage: per layer, score from the layer's statistics and keep the top experts."""

    name = "prune"

    def __init__(self, settings: dict[str, Any], num_experts: int, top_k: int) -> None:
        self.settings = settings
        self.num_experts = num_experts
        self.keep = keep_count(num_experts, top_k, settings["keep_ratio"])  # fails before any long work
        self.saliency = SALIENCY[settings["method"]]
        self.kept: dict[int, list[int]] = {}
        self.routed = torch.zeros(3, dtype=torch.float64)
        self.routed_kept = torch.zeros(3, dtype=torch.float64)

    def apply_layer(self, block: Any, stats: LayerStats) -> list[int]:
        kept = select_experts(self.saliency(stats, self.settings), self.keep)
        prune_block(block, kept)
        self.kept[stats.layer] = kept
        self.routed += stats.counts.sum(1).double()
        self.routed_kept += stats.counts[:, kept].sum(1).double()
        return kept

    def result(self) -> dict[str, Any]:
        # Share of the calibration top-k slots that went to kept experts: 1.0 means routing never needed a
        # pruned expert on this data.
        share = {
            m: round(float(self.routed_kept[i] / self.routed[i]), 6)
            for i, m in enumerate(MODALITIES)
            if self.routed[i] > 0
        }
        return {
            "experts_before": self.num_experts,
            "experts_after": self.keep,
            "kept": {str(k): v for k, v in sorted(self.kept.items())},
            "routed_share_kept": share,
        }
