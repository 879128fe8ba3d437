"""Blocked INT4 in ONNX Runtime's MatMulNBits layout: the one definition of the layout.

Two verbs, as in gpt-fast: `quantize` makes the packed tensors offline (symmetric round to nearest),
`dequantize` gives back the float weights the runtime computes with, so PyTorch and the exported graphs
agree exactly. Other quantizers (omniedge.compress.quantizers: clip search, GPTQ, AWQ) choose the codes
differently and hand them to `pack`, so every method writes this one layout:

- qweight uint8 [..., N, ceil(K/g), g/2]: codes 0..15 along K, two per byte, low nibble first;
- scales float32 [..., N, ceil(K/g)];
- zero points: 8 when absent (symmetric); asymmetric codes carry uint8 [..., N, ceil(ceil(K/g)/2)],
  packed the same way, which is MatMulNBits' packed `zero_points` input and QMoE's `fc*_zero_points`.

dequant = (code - zero point) * scale; a K that is not a multiple of g is zero-padded to whole groups.
"""

from __future__ import annotations

import math

import torch

BITS = 4
ZERO_POINT = 8  # implicit zero point of MatMulNBits when no zero_points input is given
QMIN, QMAX = -8, 7


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [..., m] (m even) -> uint8 [..., m/2], even positions in the low nibble."""
    q = codes.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., m/2] -> codes int16 [..., m]."""
    lo = (packed & 0x0F).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_zero_points(zero_points: torch.Tensor) -> torch.Tensor:
    """Zero points 0..15 [..., N, nb] -> uint8 [..., N, ceil(nb/2)] (an odd nb is padded with a 0 nibble)."""
    if zero_points.shape[-1] % 2:
        zero_points = torch.nn.functional.pad(zero_points, (0, 1))
    return pack(zero_points)


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
    return pack(q), scales.contiguous()


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, k: int, zero_points: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of `quantize`: float32 [..., N, K] (K = the original input width). `zero_points`: the
    packed uint8 [..., N, ceil(nb/2)] of asymmetric codes; None means the implicit 8."""
    q = unpack(qweight)  # [..., N, nb, group]
    if zero_points is None:
        q = q - ZERO_POINT
    else:
        z = unpack(zero_points)[..., : scales.shape[-1]]
        q = q - z.unsqueeze(-1)
    w = q.to(torch.float32) * scales.unsqueeze(-1)
    return w.flatten(-2)[..., :k].contiguous()
