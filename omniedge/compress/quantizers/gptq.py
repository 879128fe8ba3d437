"""GPTQ (Frantar et al. 2022) on Linears and fused experts, batched over experts.

For a weight W [N, K] whose inputs X have Hessian H = X^T X, GPTQ quantizes the columns one at a time
and spreads each column's rounding error over the columns not yet quantized, through the Cholesky factor
of H^-1, so that ||(W - Q) X||^2, not ||W - Q||^2, is small. As in the reference implementation:
inputs never seen (H_ii = 0) get H_ii = 1 and a zero weight column; damping adds `damp` x mean(diag H)
to the diagonal (raised tenfold, up to three times, where the Cholesky factorisation fails); updates are
lazy, `block` columns at a time. A group's scale and zero point are taken when quantization reaches the
group's first column, from the already-updated weights. With `act_order` columns go in order of
decreasing H_ii and group parameters are fixed beforehand from the original weights ("static groups"),
because the MatMulNBits layout needs each group's columns contiguous.

Fused experts [E, N, K] get one Hessian per expert from the tokens routed to it; experts with fewer than
`min_rows` rows (default: K, the rank a Hessian needs to be full) fall back to RTN with clip search, and
`Packed.fallback` counts them. A Linear with too few rows is refused. Cost per expert: N K^2 flops for
the updates plus K^3 for the factorisations; memory 4 (N K + 2 K^2) bytes per expert in a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from omniedge.compress.quantizers import grid
from omniedge.compress.quantizers.base import Codes, Packed, Quantizer, check_float_weight, check_group_size
from omniedge.compress.quantizers.observer import InputStats
from omniedge.errors import OmniedgeError


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, batched [B, K, K]."""
    eye = torch.eye(h.shape[-1], device=h.device, dtype=h.dtype)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    factor = torch.full_like(mean_diag, damp)
    for _ in range(4):
        hd = h + (factor * mean_diag)[:, None, None] * eye
        lower, info = torch.linalg.cholesky_ex(hd)
        if not bool((info != 0).any()):
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not bool((info != 0).any()):
                return upper
        factor = torch.where(info != 0, factor * 10, factor)
    raise RuntimeError("GPTQ: the damped Hessian is not positive definite even at 1000x damping")


def gptq_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    clip_search: bool = False,
) -> Codes:
    """GPTQ of B weights at once: w [B, N, K], h [B, K, K] (sums of x^T x) -> Codes [B, N, nb, g]."""
    g = group_size
    wg = grid.to_groups(w, g)
    b, n, nb, _ = wg.shape
    kp = nb * g
    W = wg.reshape(b, n, kp).clone()
    H = torch.zeros(b, kp, kp, device=w.device)
    k = w.shape[-1]
    H[:, :k, :k] = h.to(w.device, torch.float32)
    diag = H.diagonal(dim1=-2, dim2=-1)  # a view: writes go into H
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)

    if act_order:  # static groups from the original weights, then columns by decreasing H_ii
        ratio = grid.search_clip(W.reshape(b, n, nb, g), symmetric) if clip_search else 1.0
        static_s, static_z = grid.params(W.reshape(b, n, nb, g), symmetric, ratio)
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
        W = W.gather(2, perm[:, None, :].expand(b, n, kp))
        H = H.gather(1, perm[:, :, None].expand(b, kp, kp)).gather(2, perm[:, None, :].expand(b, kp, kp))
        group_of = perm // g  # [B, Kp]: the group of each permuted column
    U = _inverse_cholesky(H, damp)
    del H

    Q = torch.zeros(b, n, kp, device=w.device)
    S = torch.ones(b, n, nb, device=w.device)
    Z = torch.full((b, n, nb), 8.0, device=w.device)
    blk = max(g, block // g * g)
    for i1 in range(0, kp, blk):
        i2 = min(i1 + blk, kp)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                gid = group_of[:, col].view(b, 1, 1).expand(b, n, 1)
                s, z = static_s.gather(2, gid).squeeze(-1), static_z.gather(2, gid).squeeze(-1)
            else:
                if col % g == 0:
                    grp = W1[:, :, i : i + g].unsqueeze(-2)  # [B, N, 1, g]
                    ratio = grid.search_clip(grp, symmetric) if clip_search else 1.0
                    gs, gz = grid.params(grp, symmetric, ratio)
                    S[:, :, col // g], Z[:, :, col // g] = gs[..., 0], gz[..., 0]
                s, z = S[:, :, col // g], Z[:, :, col // g]
            x = W1[:, :, i]
            q = torch.clamp(torch.round(x / s) + z, 0, 15)
            Q[:, :, col] = q
            err = (x - (q - z) * s) / U1[:, i, i].unsqueeze(-1)
            W1[:, :, i:] -= err.unsqueeze(-1) * U1[:, i, i:].unsqueeze(1)
            E1[:, :, i] = err
        if i2 < kp:
            W[:, :, i2:] -= torch.bmm(E1, U[:, i1:i2, i2:])

    if act_order:
        Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(b, n, kp))
        S, Z = static_s, static_z
    return Codes(Q.reshape(b, n, nb, g).to(torch.uint8), S, Z)


@dataclass(frozen=True)
class GPTQ(Quantizer):
    name: ClassVar[str] = "gptq"
    needs_hessian: ClassVar[bool] = True
    group_size: int = 128
    symmetric: bool = True
    damp: float = 0.01
    act_order: bool = False
    block: int = 128
    clip_search: bool = False
    min_rows: int | None = None  # None: K (the input width)
    expert_chunk: int = 16  # experts factorised together (bounds memory)

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if not (0 < self.damp < 1) or self.block < 1 or self.expert_chunk < 1:
            raise ValueError("damp must be in (0, 1), block and expert_chunk >= 1")

    def _codes(self, w: torch.Tensor, h: torch.Tensor) -> Codes:
        return gptq_codes(
            w, h, self.group_size, self.symmetric, self.damp, self.act_order, self.block, self.clip_search
        )

    def quantize(self, w: torch.Tensor, stats: InputStats | None = None) -> Packed:
        check_float_weight(w)
        if stats is None or stats.hessian is None:
            raise ValueError(
                "GPTQ needs the weight's input statistics with a Hessian (InputObserver(hessian=True))"
            )
        k = int(w.shape[-1])
        need = self.min_rows or k
        if w.dim() == 2:
            rows = int(stats.rows)
            if rows < need:
                raise OmniedgeError(
                    f"calibration too small for GPTQ: a weight with {k} inputs saw {rows} calibration "
                    f"rows; GPTQ needs at least {need}",
                    "add calibration samples or max_tokens, or quantize with rtn or awq",
                )
            c = self._codes(w[None], stats.hessian[None])
            return Packed.from_codes(Codes(c.codes[0], c.scales[0], c.zeros[0]), k, self.symmetric)
        if w.dim() != 3 or stats.experts != w.shape[0]:
            raise ValueError(f"fused experts need w [E, N, K] and stats for E experts, got {tuple(w.shape)}")
        ok = (stats.rows >= need).to(w.device)
        e, n, nb, g = w.shape[0], w.shape[1], -(-k // self.group_size), self.group_size
        codes = torch.zeros(e, n, nb, g, dtype=torch.uint8, device=w.device)
        scales = torch.ones(e, n, nb, device=w.device)
        zeros = torch.full((e, n, nb), 8.0, device=w.device)
        bad = (~ok).nonzero().flatten()
        if bad.numel():  # the documented fallback: RTN with a weight-MSE clip search
            f = grid.rtn_codes(w[bad], self.group_size, self.symmetric, clip_search=True)
            codes[bad], scales[bad], zeros[bad] = f.codes, f.scales, f.zeros
        idx = ok.nonzero().flatten()
        for c0 in range(0, idx.numel(), self.expert_chunk):
            sel = idx[c0 : c0 + self.expert_chunk]
            c = self._codes(w[sel], stats.hessian[sel.to(stats.hessian.device)])
            codes[sel], scales[sel], zeros[sel] = c.codes, c.scales, c.zeros
        n_fallback = int(bad.numel())
        return Packed.from_codes(Codes(codes, scales, zeros), k, self.symmetric, n_fallback)
