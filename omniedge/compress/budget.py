"""How many experts each MoE layer keeps, and which: uniform, or non-uniform by a global saliency ranking.

The router after pruning is Qwen3's own (moe.topk_route): its softmax runs over the kept experts and,
with renormalisation (`norm_topk_prob: true`, how Qwen3-Omni was trained), a token whose top-k all
survive keeps its experts and weights exactly. `router_config(renormalise)` gives the config value a
pruned checkpoint gets; turning renormalisation off changes every token's MoE output and is for
experiments only. `num_experts_per_tok` is never changed: a budget that leaves a layer fewer experts
than top-k is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from omniedge.errors import OmniedgeError


def router_config(renormalise: bool = True) -> dict[str, bool]:
    """The text-config fields a pruned checkpoint gets (see the module docstring)."""
    return {"norm_topk_prob": bool(renormalise)}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _too_few(keep: int, num_experts: int, top_k: int, what: str) -> OmniedgeError:
    return OmniedgeError(
        f"{what} keeps {keep} of {num_experts} experts in a layer, fewer than the {top_k} the router "
        "picks per token",
        f"keep at least {top_k} experts per layer (keep_ratio >= {top_k / num_experts:.4g})",
    )


def _check_ratio(keep_ratio: float) -> None:
    if not (isinstance(keep_ratio, (int, float)) and 0 < keep_ratio <= 1):
        raise OmniedgeError(f"keep_ratio {keep_ratio!r} is not in (0, 1]", "give a fraction such as 0.5")


def _check_multiple(multiple_of: int, num_experts: int) -> None:
    if multiple_of < 1 or num_experts % multiple_of:
        raise OmniedgeError(
            f"multiple_of {multiple_of} does not divide the {num_experts} experts of a layer",
            "use 1 or a divisor of the expert count such as 8",
        )


def uniform_budget(num_experts: int, top_k: int, keep_ratio: float, multiple_of: int = 1) -> int:
    """Experts every layer keeps: round(E * keep_ratio) to the nearest multiple of `multiple_of`
    (halves up), refused when fewer than top-k would remain."""
    _check_ratio(keep_ratio)
    _check_multiple(multiple_of, num_experts)
    keep = min(num_experts, math.floor(num_experts * keep_ratio / multiple_of + 0.5) * multiple_of)
    if keep < top_k:
        raise _too_few(keep, num_experts, top_k, f"keep_ratio {keep_ratio}")
    return keep


def global_budget(
    layer_scores: Sequence[torch.Tensor],
    top_k: int,
    keep_ratio: float,
    min_keep: int | None = None,
    multiple_of: int = 1,
    normalise: bool = True,
) -> list[int]:
    """Experts each layer keeps when the whole model keeps round(keep_ratio * all experts): every layer
    keeps its `min_keep` best (default top-k, rounded up to `multiple_of`), and the rest of the budget
    goes to the highest-scoring remaining experts of any layer.

    Scores of different layers are made comparable by dividing each layer's by its sum (`normalise`):
    REAP grows with depth as activations do, so raw scores would empty the early layers. With
    `multiple_of` > 1 each count is then rounded to a multiple (largest remainder, total kept)."""
    _check_ratio(keep_ratio)
    sizes = [int(s.numel()) for s in layer_scores]
    if not sizes:
        raise ValueError("no layers to budget")
    for e in sizes:
        _check_multiple(multiple_of, e)
    floor = _round_up(top_k if min_keep is None else min_keep, multiple_of)
    if floor < top_k:
        raise _too_few(floor, min(sizes), top_k, f"min_keep {min_keep}")
    if floor > min(sizes):
        raise OmniedgeError(f"min_keep {floor} is more than a layer's {min(sizes)} experts", "lower min_keep")
    units = round(sum(sizes) * keep_ratio / multiple_of)
    total = units * multiple_of
    if total < floor * len(sizes):
        raise OmniedgeError(
            f"keep_ratio {keep_ratio} keeps {total} experts in all, fewer than the per-layer floor "
            f"of {floor} x {len(sizes)} layers",
            f"raise keep_ratio to >= {floor * len(sizes) / sum(sizes):.4g} or lower min_keep",
        )
    normed = []
    for s in layer_scores:
        s = s.detach().double().cpu().flatten()
        normed.append(s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) if normalise else s)
    counts = [floor] * len(sizes)
    # The experts beyond each layer's floor, best first across all layers (ties: lower layer, lower index).
    rest: list[tuple[float, int, int]] = []
    for li, s in enumerate(normed):
        order = torch.sort(s, descending=True, stable=True).indices.tolist()
        rest.extend((-float(s[j]), li, rank) for rank, j in enumerate(order[floor:]))
    rest.sort()
    for _, li, _ in rest[: total - floor * len(sizes)]:
        counts[li] += 1
    if multiple_of > 1:
        counts = _round_counts(counts, sizes, floor, multiple_of, total)
    return counts


def _round_counts(counts: list[int], sizes: list[int], floor: int, m: int, total: int) -> list[int]:
    """Round each count to a multiple of m in [floor, size], keeping the sum at `total` (a multiple of m)."""
    out = [max(floor, (c // m) * m) for c in counts]
    remainders = sorted(range(len(counts)), key=lambda i: (-(counts[i] - out[i]), i))
    spare = total - sum(out)
    for i in remainders:
        if spare <= 0:
            break
        if out[i] + m <= sizes[i]:
            out[i] += m
            spare -= m
    return out


def select(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring expert indices of one layer, ascending (ties: lower index wins)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} experts")
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices[:keep]
    return sorted(int(i) for i in order)


def routed_share_kept(counts: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Per modality, the share of calibration top-k slots [M, E] counts that went to kept experts
    (1.0: on this data routing never needed a pruned expert)."""
    c = counts.double()
    return c[:, list(kept)].sum(-1) / c.sum(-1).clamp_min(1)
