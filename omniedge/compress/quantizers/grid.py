"""The INT4 grid: per-group scales and zero points, codes, clip search, and round to nearest (RTN).

Symmetric: scale = r * max(-min / 8, max / 7), zero point 8 (the codes of omniedge.int4.quantize when
r = 1). Asymmetric: the group's range [min(w, 0), max(w, 0)] shrunk by r, scale = range / 15, zero point
round(-lo / scale) in 0..15. A clip search tries r from 1 down to `clip_min` per group and keeps the r
with the smallest error: the weights' squared error, or (output-aware, when input samples are given) the
squared error of the group's contribution to W x over the samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from omniedge.compress.quantizers.base import Codes, Packed, Quantizer, check_float_weight, check_group_size
from omniedge.compress.quantizers.observer import InputStats

CHUNK_ELEMENTS = 1 << 24  # clip search works on this many weights at a time (bounds temporaries)


def to_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """[..., N, K] -> float32 [..., N, ceil(K/g), g], zero-padded along K."""
    k = w.shape[-1]
    nb = math.ceil(k / g)
    w = w.detach().float()
    if nb * g != k:
        w = torch.nn.functional.pad(w, (0, nb * g - k))
    return w.reshape(*w.shape[:-1], nb, g)


def params(
    wg: torch.Tensor, symmetric: bool, ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zero points) [...] of groups wg [..., g] with clip ratio r (broadcastable to [...])."""
    if symmetric:
        s = torch.maximum(wg.amin(-1) / -8.0, wg.amax(-1) / 7.0).clamp_min(0) * ratio
        z = torch.full_like(s, 8.0)
    else:
        lo = wg.amin(-1).clamp_max(0) * ratio
        hi = wg.amax(-1).clamp_min(0) * ratio
        s = (hi - lo) / 15.0
        z = torch.clamp(torch.round(-lo / torch.where(s == 0, 1.0, s)), 0, 15)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return s, z


def codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, 15)


def fake(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Quantize and dequantize in float: what the weights become."""
    return (codes(wg, s, z) - z.unsqueeze(-1)) * s.unsqueeze(-1)


def clip_ratios(steps: int, clip_min: float) -> list[float]:
    return [1.0 - (1.0 - clip_min) * i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]


def _best_ratio(
    wg: torch.Tensor, symmetric: bool, ratios: list[float], x: torch.Tensor | None
) -> torch.Tensor:
    """Per group [..., N, nb], the ratio with the least error. x: samples [..., S, nb, g] or None."""
    best_err = torch.full(wg.shape[:-1], float("inf"), device=wg.device)
    best = torch.ones(wg.shape[:-1], device=wg.device)
    for r in ratios:
        d = wg - fake(wg, *params(wg, symmetric, r))
        if x is None:
            err = d.square().sum(-1)
        else:  # contribution of each group to the outputs: [..., N, nb, S]
            err = torch.einsum("...nbg,...sbg->...nbs", d, x).square().sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def search_clip(
    wg: torch.Tensor,
    symmetric: bool,
    steps: int = 20,
    clip_min: float = 0.5,
    samples: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best clip ratio per group [..., N, nb] of wg [..., N, nb, g]. samples: input rows [..., S, K]
    (same leading dims as wg's, e.g. per expert) for the output-aware error; None for weight MSE."""
    ratios = clip_ratios(steps, clip_min)
    lead, (n, nb, g) = wg.shape[:-3], wg.shape[-3:]
    x = None if samples is None else to_groups(samples.to(wg.device), g)  # [..., S, nb, g]
    flat = wg.reshape(-1, n, nb, g)
    xf = None if x is None else x.reshape(-1, *x.shape[-3:])
    out = torch.empty(flat.shape[:-1], device=wg.device)
    per_row = nb * (g + (0 if x is None else x.shape[-3]))  # d and the [N, nb, S] contributions
    rows = max(1, CHUNK_ELEMENTS // per_row)
    for e in range(flat.shape[0]):
        xe = None if xf is None else xf[e]
        for r0 in range(0, n, rows):
            out[e, r0 : r0 + rows] = _best_ratio(flat[e, r0 : r0 + rows], symmetric, ratios, xe)
    return out.reshape(*lead, n, nb)


def rtn_codes(
    w: torch.Tensor,
    group_size: int,
    symmetric: bool,
    clip_search: bool = False,
    samples: torch.Tensor | None = None,
    steps: int = 20,
    clip_min: float = 0.5,
) -> Codes:
    wg = to_groups(w, group_size)
    ratio = search_clip(wg, symmetric, steps, clip_min, samples) if clip_search else 1.0
    s, z = params(wg, symmetric, ratio)
    return Codes(codes(wg, s, z).to(torch.uint8), s, z)


@dataclass(frozen=True)
class RTN(Quantizer):
    """Round to nearest; `clip_search` shrinks each group's range to the weight-MSE optimum."""

    name: ClassVar[str] = "rtn"
    group_size: int = 128
    symmetric: bool = True
    clip_search: bool = False
    clip_steps: int = 20
    clip_min: float = 0.5

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if not (0 < self.clip_min <= 1 and self.clip_steps >= 1):
            raise ValueError("clip_min must be in (0, 1] and clip_steps >= 1")

    def quantize(self, w: torch.Tensor, stats: InputStats | None = None) -> Packed:
        check_float_weight(w)
        c = rtn_codes(
            w, self.group_size, self.symmetric, self.clip_search, None, self.clip_steps, self.clip_min
        )
        return Packed.from_codes(c, int(w.shape[-1]), self.symmetric)
