"""AWQ (Lin et al. 2023): activation-aware input scales, folded so the exported graph is unchanged.

For weights that share one input x, AWQ quantizes W diag(s) and feeds x / s, choosing
s = mean|x|^alpha (normalised so sqrt(max s * min s) = 1) by a grid search over alpha in [0, 1) that
minimises the output error on sampled calibration rows; alpha = 0 (no scaling) is always a candidate.
After scaling, each group's clip ratio is searched on the same rows (output-aware clip). The division
by s is folded into the op that makes x, so no new node appears (Qwen3-Omni thinker decoder layer):

| group       | weights scaled by s (columns)  | 1/s folded into                                           |
|-------------|--------------------------------|-----------------------------------------------------------|
| attn_in     | q_proj, k_proj, v_proj         | input_layernorm.weight                                    |
| attn_out    | o_proj                         | v_proj rows (s tied across the q heads of a kv head)      |
| moe_in      | every expert's gate_up_proj    | post_attention_layernorm.weight, and the router's columns |
|             |                                | multiplied by s so its logits (and routing) are unchanged |
| expert_mid  | each expert's down_proj        | that expert's up_proj rows (gate_up_proj rows I..2I)      |

moe_in has ONE s for all experts because they share the norm. down_proj's input is act(gate) * up,
linear in up, so a per-expert s folds exactly into the up rows; scaling whole rows leaves those rows'
INT4 codes unchanged (the group scales absorb it). The vision MLP's fc2 follows a GELU, which no scale
passes through: it gets the output-aware clip only (as `input_scale` is simply not called for it).
Experts (or Linears) with fewer than `min_rows` calibration rows keep s = 1 and a weight-MSE clip; the
count is `Packed.fallback`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from omniedge.compress.quantizers import grid
from omniedge.compress.quantizers.base import Packed, Quantizer, check_float_weight, check_group_size
from omniedge.compress.quantizers.observer import InputStats

Tie = Callable[[torch.Tensor], torch.Tensor]  # [..., K] -> [..., K], equal on channels that must share s
GROUPS = ("attn_in", "attn_out", "moe_in", "expert_mid")


def tie_kv_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> Tie:
    """o_proj's input channels (q head h, dim d) share a scale across the q heads of one kv head,
    so 1/s can live in v_proj's rows."""
    rep = num_heads // num_kv_heads

    def tie(x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(*x.shape[:-1], num_kv_heads, rep, head_dim)
        return v.mean(-2, keepdim=True).expand_as(v).reshape(x.shape)

    return tie


def _error(
    w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, group_size: int, symmetric: bool
) -> torch.Tensor:
    """||x (W - Q(W s) / s)^T||^2 per leading index: w [..., N, K], s [..., K], x [..., S, K]."""
    wf = w.float()
    wg = grid.to_groups(wf * s.unsqueeze(-2), group_size)
    w_hat = grid.fake(wg, *grid.params(wg, symmetric)).flatten(-2)[..., : wf.shape[-1]] / s.unsqueeze(-2)
    return torch.matmul(x, (wf - w_hat).transpose(-1, -2)).square().sum((-1, -2))


def _output_error(
    w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, group_size: int, symmetric: bool, chunk: int = 16
) -> torch.Tensor:
    """`_error`, fused experts [E, N, K] `chunk` at a time to bound the temporaries (s: [K] or [E, K])."""
    if w.dim() != 3:
        return _error(w, s, x, group_size, symmetric)
    se = s.expand(w.shape[0], -1)
    return torch.cat(
        [
            _error(w[i : i + chunk], se[i : i + chunk], x[i : i + chunk], group_size, symmetric)
            for i in range(0, w.shape[0], chunk)
        ]
    )


def search_scale(
    weights: Sequence[torch.Tensor],
    stats: InputStats,
    group_size: int,
    symmetric: bool,
    steps: int = 20,
    per_expert: bool = False,
    tie: Tie | None = None,
    min_rows: int = 16,
) -> torch.Tensor:
    """AWQ's input scale for weights sharing one input: [K] (Linears, or all experts together) or
    [E, K] (`per_expert`: each expert its own, s = 1 where an expert saw fewer than `min_rows`)."""
    if stats.samples is None:
        raise ValueError("AWQ needs sampled input rows (InputObserver(samples=...))")
    experts = stats.experts
    dev = weights[0].device
    x = stats.samples.to(dev)
    if experts is not None and not per_expert:  # one s for all experts, from every routed row
        xm = stats.abs_sum.sum(0) / stats.rows.sum().clamp_min(1)
    else:
        xm = stats.abs_mean()
    xm = xm.to(dev).clamp_min(1e-4)
    if tie is not None:
        xm = tie(xm)
    lead = () if experts is None or not per_expert else (experts,)
    best_err = torch.full(lead, float("inf"), device=dev)
    best = torch.ones(*lead, xm.shape[-1], device=dev)
    for i in range(steps):
        alpha = i / steps
        s = xm.pow(alpha)
        s = s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()
        err = torch.zeros(lead, device=dev)
        for w in weights:
            e = _output_error(w, s, x, group_size, symmetric)
            err = err + (e if per_expert or experts is None else e.sum())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), s, best)
    if per_expert and experts is not None:
        best = torch.where((stats.rows.to(dev) >= min_rows).unsqueeze(-1), best, torch.ones_like(best))
    return best


@dataclass(frozen=True)
class AWQ(Quantizer):
    name: ClassVar[str] = "awq"
    needs_samples: ClassVar[bool] = True
    group_size: int = 128
    symmetric: bool = True
    steps: int = 20  # alpha grid
    min_rows: int = 16  # fewer routed rows: no scale, weight-MSE clip (the fallback)
    clip_steps: int = 20
    clip_min: float = 0.5
    clip_rows: int = 128  # sampled rows used by the output-aware clip search

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if self.steps < 1 or self.min_rows < 1 or self.clip_rows < 1:
            raise ValueError("steps, min_rows and clip_rows must be >= 1")

    def input_scale(
        self,
        weights: Sequence[torch.Tensor],
        stats: InputStats,
        *,
        per_expert: bool = False,
        tie: Tie | None = None,
    ) -> torch.Tensor | None:
        return search_scale(
            weights, stats, self.group_size, self.symmetric, self.steps, per_expert, tie, self.min_rows
        )

    def quantize(self, w: torch.Tensor, stats: InputStats | None = None) -> Packed:
        check_float_weight(w)
        k = int(w.shape[-1])
        if stats is None or stats.samples is None:
            raise ValueError("AWQ needs sampled input rows (InputObserver(samples=...))")
        ok = (stats.rows >= self.min_rows).to(w.device)
        x = stats.samples[..., : self.clip_rows, :].to(w.device)
        clip = {"steps": self.clip_steps, "clip_min": self.clip_min}
        if w.dim() == 2:
            c = grid.rtn_codes(w, self.group_size, self.symmetric, True, x if bool(ok) else None, **clip)
            return Packed.from_codes(c, k, self.symmetric, 0 if bool(ok) else 1)
        c = grid.rtn_codes(w, self.group_size, self.symmetric, True, x, **clip)
        bad = (~ok).nonzero().flatten()
        if bad.numel():
            f = grid.rtn_codes(w[bad], self.group_size, self.symmetric, True, None, **clip)
            c.codes[bad], c.scales[bad], c.zeros[bad] = f.codes, f.scales, f.zeros
        return Packed.from_codes(c, k, self.symmetric, int(bad.numel()))


# ---------------------------------------------------------------- folding into a decoder layer


@torch.no_grad()
def _mul_(p: torch.Tensor, factor: torch.Tensor) -> None:
    p.copy_((p.float() * factor.to(p.device)).to(p.dtype))


@torch.no_grad()
def fold_into_layer(layer: Any, group: str, s: torch.Tensor) -> None:
    """Apply AWQ scale s of `group` (see the table above) to a Qwen3-Omni thinker decoder layer in place:
    the consuming weights' input columns x s, the producing op / 1/s. The layer's float outputs are
    unchanged (up to rounding)."""
    s = s.float()
    attn, mlp = layer.self_attn, layer.mlp
    if group == "attn_in":
        _mul_(layer.input_layernorm.weight, 1 / s)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            _mul_(proj.weight, s)
    elif group == "attn_out":
        nkv, hd = attn.v_proj.weight.shape[0] // attn.head_dim, attn.head_dim
        t = s.reshape(nkv, -1, hd)
        if not torch.allclose(t, t[:, :1].expand_as(t)):
            raise ValueError("attn_out scales must be tied across the q heads of a kv head (tie_kv_heads)")
        inv = 1 / t[:, 0].reshape(-1)  # [nkv * hd], v_proj's output rows
        _mul_(attn.v_proj.weight, inv[:, None])
        if attn.v_proj.bias is not None:
            _mul_(attn.v_proj.bias, inv)
        _mul_(attn.o_proj.weight, s)
    elif group == "moe_in":
        _mul_(layer.post_attention_layernorm.weight, 1 / s)
        _mul_(mlp.gate.weight, s)
        _mul_(mlp.experts.gate_up_proj, s)
    elif group == "expert_mid":
        gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
        inter = down.shape[-1]
        if s.shape != (down.shape[0], inter):
            raise ValueError(
                f"expert_mid scales must be [E, I] = {(down.shape[0], inter)}, got {tuple(s.shape)}"
            )
        _mul_(gate_up[:, inter:, :], (1 / s)[:, :, None])
        _mul_(down, s[:, None, :])
    else:
        raise ValueError(f"unknown AWQ group {group!r}; one of {GROUPS}")
