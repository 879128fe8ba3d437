"""Blocked symmetric INT4 (round to nearest) in ONNX Runtime's MatMulNBits layout: the one definition of the layout.

Two verbs, as in gpt-fast: `quantize` makes the packed tensors offline, `dequantize` gives back the
float weights the runtime computes with, so PyTorch and the exported graphs agree exactly.
"""

from __future__ import annotations

import math

import torch

BITS = 4
ZERO_POINT = 8  # implicit zero point of MatMulNBits when no zero_points input is given
QMIN, QMAX = -8, 7


def quantize(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (qweight uint8 [..., N, nb, group_size/2], scales float32 [..., N, nb])."""
    if group_size % 2:
        raise ValueError("group_size must be even")
    *lead, n, k = w.shape
    nb = math.ceil(k / group_size)
    w = w.detach().to(torch.float32)
    if nb * group_size != k:
        w = torch.nn.functional.pad(w, (0, nb * group_size - k))
    g = w.reshape(*lead, n, nb, group_size)
    # The smallest scale that represents both extremes without clipping: the negative side has one more
    # code (-8) than the positive side (7).
    scales = torch.maximum(-g.amin(dim=-1) / -QMIN, g.amax(dim=-1) / QMAX).clamp_min(0)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.clamp(torch.round(g / scales.unsqueeze(-1)), QMIN, QMAX).to(torch.int16) + ZERO_POINT
    q = q.to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed.contiguous(), scales.contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `quantize`: float32 [..., N, K] (K = the original input width)."""
    lo = (qweight & 0x0F).to(torch.int16)
    hi = (qweight >> 4).to(torch.int16)
    q = torch.stack((lo, hi), dim=-1).flatten(-2) - ZERO_POINT  # [..., N, nb, group]
    w = q.to(torch.float32) * scales.unsqueeze(-1)
    return w.flatten(-2)[..., :k].contiguous()
