"""Expert pruning: keep the same number of experts in every thinker MoE layer, chosen by a saliency score.

A saliency is a function from calibration statistics to per-layer scores (higher = keep). Frequency and
router-weight saliencies are here; REAP (router weight x expert output norm) plugs in with
`register_saliency` once calibration records expert output norms, without touching the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from omniedge.compress.calibration import MODALITIES, RouterStats
from omniedge.errors import OmniedgeError
from omniedge.models.family import moe_blocks, thinker_parts

Saliency = Callable[[RouterStats, dict[str, Any]], torch.Tensor]  # -> [L, E] float, higher = more important


def _combine(per_modality: torch.Tensor, stats: RouterStats, weighting: str) -> torch.Tensor:
    """[L, 3, E] -> [L, E]. `modality`: each modality that was seen counts equally (a share of its own
    routed slots), so a few audio tokens are not drowned by many text tokens; `token`: raw sums."""
    x = per_modality.double()
    if weighting == "token":
        return x.sum(1)
    seen = stats.tokens > 0
    if not bool(seen.any()):
        raise OmniedgeError("calibration saw no tokens", "give calibration.samples > 0")
    slots = (stats.tokens.double() * stats.top_k).clamp(min=1)
    return (x / slots[None, :, None])[:, seen].mean(1)


def frequency_saliency(stats: RouterStats, settings: dict[str, Any]) -> torch.Tensor:
    """How often each expert was among the router's top-k."""
    return _combine(stats.counts, stats, settings.get("weighting", "modality"))


def router_weight_saliency(stats: RouterStats, settings: dict[str, Any]) -> torch.Tensor:
    """Summed (renormalised) router weight each expert received when chosen."""
    return _combine(stats.weights, stats, settings.get("weighting", "modality"))


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


def select_experts(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """Per layer, the `keep` highest-scoring expert indices in ascending order (ties: lower index wins)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :keep]
    return [sorted(int(i) for i in row) for row in order]


def _slice_param(module: Any, name: str, idx: torch.Tensor) -> None:
    p = getattr(module, name)
    new = torch.nn.Parameter(
        p.data.index_select(0, idx.to(p.device)).contiguous(), requires_grad=p.requires_grad
    )
    setattr(module, name, new)


def _set_num_experts(obj: Any, n: int) -> None:
    if hasattr(obj, "num_experts"):
        obj.num_experts = n


def prune_experts(model: Any, keep: Sequence[Sequence[int]]) -> None:
    """Keep the listed experts of every MoE layer in place (router rows and fused expert weights), in order,
    and update every thinker config that holds num_experts."""
    blocks = moe_blocks(model)
    counts = {len(k) for k in keep}
    if len(keep) != len(blocks) or len(counts) != 1:
        raise ValueError(f"need one equally long keep list per MoE layer ({len(blocks)}), got {len(keep)}")
    n = counts.pop()
    for (_, block), kept in zip(blocks, keep, strict=True):
        e = block.gate.weight.shape[0]
        if any(not 0 <= k < e for k in kept) or len(set(kept)) != len(kept):
            raise ValueError(f"bad expert indices {list(kept)} for {e} experts")
        idx = torch.tensor(sorted(kept), dtype=torch.long)
        for pname, p in list(block.gate.named_parameters(recurse=False)):
            if p.shape[0] == e:
                _slice_param(block.gate, pname, idx)
        experts = block.experts
        if isinstance(experts, torch.nn.ModuleList):  # per-expert layout of older releases
            block.experts = torch.nn.ModuleList([experts[i] for i in idx.tolist()])
        else:
            for pname, p in list(experts.named_parameters(recurse=False)):
                if p.dim() == 3 and p.shape[0] == e:
                    _slice_param(experts, pname, idx)
            _set_num_experts(experts, n)
        _set_num_experts(block.gate, n)
        if hasattr(block.gate, "out_features"):
            block.gate.out_features = n
    # Every config object the thinker's modules hold (they may be copies), plus the top-level one.
    parts = thinker_parts(model)
    configs = {id(c): c for m in parts.text_model.modules() if (c := getattr(m, "config", None)) is not None}
    configs[id(parts.text_model.config)] = parts.text_model.config
    top = getattr(model, "config", None)
    for holder in (top, getattr(top, "thinker_config", None), getattr(parts.thinker, "config", None)):
        tc = getattr(holder, "text_config", None)
        if tc is not None and hasattr(tc, "num_experts"):
            configs[id(tc)] = tc
    for c in configs.values():
        _set_num_experts(c, n)


def prune(model: Any, stats: RouterStats, settings: dict[str, Any]) -> dict[str, Any]:
    """Score, select and cut experts as the prune stage's settings say; returns what was kept."""
    blocks = moe_blocks(model)
    if [i for i, _ in blocks] != stats.layers:
        raise OmniedgeError(
            "calibration statistics do not match the model's MoE layers",
            "delete the calibration cache beside the output directory and re-run",
        )
    e = stats.num_experts
    keep = keep_count(e, stats.top_k, settings["keep_ratio"])
    scores = SALIENCY[settings["method"]](stats, settings)
    kept = select_experts(scores, keep)
    # Share of the calibration top-k slots that went to kept experts: 1.0 means routing never needed a
    # pruned expert on this data.
    mask = torch.zeros(len(kept), e, dtype=torch.bool)
    for li, k in enumerate(kept):
        mask[li, k] = True
    share: dict[str, float] = {}
    for mi, m in enumerate(MODALITIES):
        total = stats.counts[:, mi].sum()
        if total > 0:
            share[m] = round(float(stats.counts[:, mi][mask].sum() / total), 6)
    prune_experts(model, kept)
    return {
        "experts_before": e,
        "experts_after": keep,
        "kept": {str(layer): k for layer, k in zip(stats.layers, kept, strict=True)},
        "routed_share_kept": share,
    }
