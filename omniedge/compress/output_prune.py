"""The `output` method of the prune stage: a layer's experts ranked by greedy removal, each step taking away
the expert whose loss changes the MoE block's output on the teacher's calibration tokens least.

Saliencies (omniedge.compress.saliency) score each expert alone from routing statistics; what pruning
costs depends on which experts go together, because a token that loses one of its top-k experts is routed to
its next-best kept one. This method measures that directly, as "Not All Experts are Equal" (Lu et al., 2024)
does by enumerating expert subsets on small MoEs: the error of a kept set is

    sum_t c_t ||y_t - y_hat_t(kept)||^2 / sum_t c_t ||y_t||^2

with y_t the unpruned block's output for calibration token t, y_hat_t(kept) the output of the block with
only `kept` (the router's top-k among them, renormalised when `renormalise` is on), and c_t each token's
weight as `reconstruct` weighs its fit (omniedge.compress.reconstruct.token_weights, the stage's
`token_weight`: relative to the token's MoE output, or to its residual stream after the MoE), each modality
present weighing the same in total, times a per-modality factor when the stage's `weighting` gives one;
`weighting: token` leaves the modalities unbalanced.

Each expert's output is computed once for the tokens whose router ranks it among their first CANDIDATES
experts (all experts when a layer has that few): y_hat then only regroups those outputs, so one trial costs
a gather, not a forward pass. A token that has lost more than CANDIDATES - top_k of its candidates is
approximated by the candidates it has left. At most MAX_ROWS calibration tokens are used (a seeded sample).
Greedy removal stops at the layer's budget: the removed experts score their removal step, the kept ones
score above every removed one, ordered by what removing each of them alone would then cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from omniedge.compress.layer_inputs import CHUNK_ROWS
from omniedge.compress.reconstruct import token_weights
from omniedge.models.family import MODALITIES

METHOD = "output"
CANDIDATES = 32  # experts per token whose outputs are computed (every one when a layer has no more)
MAX_ROWS = 32_768  # calibration tokens used per layer (a seeded sample beyond this)


def _candidate_outputs(block: Any, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """expert_{cand[t, m]}(x_t) for every token and candidate slot: float32 [T, M, H]."""
    experts = block.experts
    out = torch.zeros(*cand.shape, x.shape[-1], dtype=torch.float32, device=x.device)
    for e in range(int(experts.gate_up_proj.shape[0])):
        tok, slot = (cand == e).nonzero(as_tuple=True)
        for c in range(0, tok.shape[0], CHUNK_ROWS):
            t, s = tok[c : c + CHUNK_ROWS], slot[c : c + CHUNK_ROWS]
            g, u = F.linear(x[t], experts.gate_up_proj[e]).chunk(2, dim=-1)
            out[t, s] = F.linear(experts.act_fn(g) * u, experts.down_proj[e]).float()
    return out


class _Trial:
    """The weighted output error of a kept set of experts (see the module docstring)."""

    @torch.no_grad()
    def __init__(
        self, block: Any, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, top_k: int, normalise: bool
    ) -> None:
        self.logits = F.linear(x, block.gate.weight).float()  # [T, E]
        m = min(int(self.logits.shape[1]), CANDIDATES)
        self.cand_logits, self.cand = self.logits.topk(m, dim=-1)  # [T, M]
        self.out = _candidate_outputs(block, x, self.cand)
        self.y, self.c, self.top_k, self.normalise = y.float(), c, top_k, normalise
        self.denom = float((c * self.y.square().sum(-1)).sum()) or 1.0

    @torch.no_grad()
    def error(self, kept: torch.Tensor) -> float:
        ok = kept[self.cand]  # [T, M]
        top, slot = self.cand_logits.masked_fill(~ok, float("-inf")).topk(self.top_k, dim=-1)  # [T, k]
        if self.normalise:
            w = torch.softmax(top, dim=-1)
        else:  # the softmax over every kept expert, not only the candidates
            lse = torch.logsumexp(self.logits.masked_fill(~kept, float("-inf")), dim=-1, keepdim=True)
            w = torch.exp(top - lse)
        w = torch.nan_to_num(w, nan=0.0)  # a token with no kept candidate: nothing left of its output
        picked = self.out.gather(1, slot.unsqueeze(-1).expand(-1, -1, self.out.shape[-1]))  # [T, k, H]
        pred = torch.einsum("tk,tkh->th", w, picked)
        return float((self.c * (self.y - pred).square().sum(-1)).sum()) / self.denom


def _weights(
    y: torch.Tensor,
    modality: torch.Tensor,
    weighting: str | Mapping[str, float],
    token_weight: str,
    resid_sq: torch.Tensor | None,
) -> torch.Tensor:
    """c_t (reconstruct.token_weights' `token_weight`); modalities balanced unless `weighting` is `token`."""
    if weighting == "token":
        return token_weights(y, token_weight, None, resid_sq)
    c = token_weights(y, token_weight, modality, resid_sq)
    if isinstance(weighting, Mapping):
        scale = torch.tensor([float(weighting.get(m, 0.0)) for m in MODALITIES], device=c.device)
        c = c * scale[modality.long().to(c.device)]
    return c


def greedy_removal_scores(
    block: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    modality: torch.Tensor,
    top_k: int,
    normalise: bool,
    keep: int,
    weighting: str | Mapping[str, float] = "modality",
    seed: int = 0,
    token_weight: str = "relative",
    resid_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Scores [E] (higher = keep) of one MoE block's experts by greedy removal down to `keep`, on tokens
    x [T, H] with the unpruned block's outputs y [T, H] and modalities [T]; and what the removal cost
    (the error after each step)."""
    e_count = int(block.gate.weight.shape[0])
    rows = int(x.shape[0])
    if rows > MAX_ROWS:
        pick = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:MAX_ROWS].to(x.device)
        x, y, modality = x[pick], y[pick], modality[pick]
        resid_sq = None if resid_sq is None else resid_sq[pick]
    with torch.inference_mode():
        c = _weights(y, modality, weighting, token_weight, resid_sq)
        trial = _Trial(block, x, y, c, top_k, normalise)
        kept = torch.ones(e_count, dtype=torch.bool, device=x.device)
        scores = torch.zeros(e_count, dtype=torch.float64)
        errors: list[float] = []
        for step in range(e_count - keep):
            best, best_err = -1, float("inf")
            for e in kept.nonzero().flatten().tolist():
                kept[e] = False
                err = trial.error(kept)
                kept[e] = True
                if err < best_err:
                    best, best_err = e, err
            kept[best] = False
            scores[best] = step
            errors.append(round(best_err, 6))
        left = kept.nonzero().flatten().tolist()
        alone = []
        for e in left:
            kept[e] = False
            alone.append(trial.error(kept))
            kept[e] = True
        for rank, i in enumerate(sorted(range(len(left)), key=lambda i: alone[i])):
            scores[left[i]] = e_count - keep + rank
    info = {
        "rows": int(x.shape[0]),
        "candidates": int(trial.cand.shape[1]),
        "error_after_each_removal": errors,
    }
    return scores, info
