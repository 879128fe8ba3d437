"""The `reconstruct` stage: after pruning, re-fit the kept experts' down projections so that the MoE block's
output on the teacher's calibration tokens comes as close as least squares allows to the unpruned block's.

Pruning takes away experts whose share of a token's output then goes missing (the router renormalises over
the kept ones). The kept experts' intermediate activations h_e(x) = act(G_e x) * (U_e x) do not change, so
the block's output is linear in their down projections: y(x) = sum_e w_e(x) D_e h_e(x). The stage solves

    min over D  sum_x c_x ||y(x) - y_teacher(x)||^2 + sum_e lambda_e ||D_e - D_e0||^2

(c_x: each token's weight, `token_weight`)
by block coordinate descent over the experts: each step is one ridge regression of an expert's [H, I] down
projection given the others (exact for that block; the objective falls at every step), `sweeps` passes over
the layer's experts. The ridge term pulls D_e towards its trained value, lambda_e = `damp` x the mean of the
diagonal of that expert's Gram matrix (as GPTQ damps its Hessian), so an expert that saw few calibration tokens
barely moves; with nothing pruned the teacher's weights are the exact solution and come back unchanged.

This is a per-layer output reconstruction in the sense of GPTQ's, applied to what pruning changed: no
gradient, no labels, the teacher's calibration inputs of the layer (omniedge.compress.layer_inputs) and its
MoE output on them. A quantize stage after it quantizes the re-fitted weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from omniedge.compress.layer_inputs import CHUNK_ROWS
from omniedge.compress.moe import route
from omniedge.compress.recipe import as_choice, as_float, as_int, check_keys
from omniedge.compress.stages import LayerWork, ModelFacts, Stage


@dataclass(frozen=True)
class ReconstructSettings:
    damp: float = 0.01  # ridge weight towards the trained down projection, x the mean Gram diagonal
    sweeps: int = 3  # passes of block coordinate descent over the layer's experts
    token_weight: str = "relative"  # each token's squared error: relative to its output's norm, or uniform

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "reconstruct") -> ReconstructSettings:
        d = {**asdict(cls()), **check_keys(dict(raw or {}), asdict(cls()), where)}
        return cls(
            damp=as_float(d["damp"], f"{where}.damp", 0.0, 100.0),
            sweeps=as_int(d["sweeps"], f"{where}.sweeps"),
            token_weight=as_choice(d["token_weight"], f"{where}.token_weight", TOKEN_WEIGHTS),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TOKEN_WEIGHTS = ("relative", "uniform")


def _token_weights(y: torch.Tensor, how: str) -> torch.Tensor:
    """c_t per token [T]: `uniform` 1 (plain least squares: a few tokens with outputs of huge norm, such as
    the first of a sequence, then outweigh all the others); `relative` 1 / (||y_t||^2 + mean ||y||^2), so
    that each token's error counts relative to its own output (the mean keeps near-zero outputs from
    dominating instead)."""
    if how == "uniform":
        return torch.ones(y.shape[0], dtype=torch.float32, device=y.device)
    sq = y.float().square().sum(-1)
    return 1.0 / (sq + sq.mean().clamp_min(1e-30))


def _features(block: Any, x: torch.Tensor, tok: torch.Tensor, weight: torch.Tensor, e: int) -> torch.Tensor:
    """w_e(x) * act(G_e x) * (U_e x) for the tokens `tok` routed to expert e, float32 [n, I]."""
    experts = block.experts
    parts = []
    for c in range(0, tok.shape[0], CHUNK_ROWS):
        g, u = F.linear(x[tok[c : c + CHUNK_ROWS]], experts.gate_up_proj[e]).chunk(2, dim=-1)
        parts.append((experts.act_fn(g) * u).float() * weight[c : c + CHUNK_ROWS, None])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def refit_down(
    block: Any,
    x: torch.Tensor,
    y_teacher: torch.Tensor,
    top_k: int,
    normalise: bool,
    damp: float,
    sweeps: int,
    token_weight: str = "relative",
) -> dict[str, Any]:
    """Re-fit `block.experts.down_proj` in place (see the module docstring) on tokens x [T, H] whose teacher
    MoE output is y_teacher [T, H]. Returns the (token-weighted) relative calibration error before and after."""
    down = block.experts.down_proj  # [E, H, I]
    with torch.inference_mode():
        r = route(x, block.gate.weight, top_k, normalise)
        # each token's squared error weighted by c_t (see TOKEN_WEIGHTS), applied as sqrt(c_t) on both sides
        root = _token_weights(y_teacher, token_weight).sqrt()
        spans = [
            (e, tok, r.weights[tok, r.slot[a:b]].float() * root[tok])
            for e, a, b in r.spans()
            for tok in (r.token[a:b],)
        ]
        trained = down.detach().float().clone()
        current = trained.clone()
        y = y_teacher.float() * root[:, None]
        resid = y.clone()  # (y_teacher - y(x)) sqrt(c) with the current weights
        for e, tok, w in spans:
            resid.index_add_(0, tok, -(_features(block, x, tok, w, e) @ current[e].T))
        scale = float(y.square().sum()) or 1.0
        before = float(resid.square().sum()) / scale
        for _ in range(sweeps):
            for e, tok, w in spans:
                h = _features(block, x, tok, w, e)
                gram = h.T @ h
                lam = damp * float(gram.diagonal().mean())
                if lam <= 0:  # no signal for this expert (all features zero): keep what it has
                    continue
                # the change of D_e that best explains the residual, given the other experts (solved as a
                # change, so a layer with nothing left to explain gets exactly none)
                rhs = h.T @ resid[tok] + lam * (trained[e] - current[e]).T
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                step = torch.linalg.solve(gram + lam * eye, rhs).T  # [H, I]
                resid.index_add_(0, tok, -(h @ step.T))
                current[e] += step
        after = float(resid.square().sum()) / scale
        down.data.copy_(current.to(down.dtype))
    return {"error_before": round(before, 6), "error_after": round(after, 6), "experts": len(spans)}


class ReconstructStage(Stage):
    name = "reconstruct"
    settings_type = ReconstructSettings
    settings: ReconstructSettings
    needs_inputs = True

    def __init__(self, settings: ReconstructSettings, model: ModelFacts) -> None:
        super().__init__(settings, model)
        self.layers: dict[int, dict[str, Any]] = {}

    def apply(self, work: LayerWork) -> None:
        if not work.is_moe or work.inputs is None:
            return
        x, y = work.inputs.moe_rows()
        s = self.settings
        out = refit_down(work.layer.mlp, x, y, work.top_k, work.normalise, s.damp, s.sweeps, s.token_weight)
        self.layers[work.index] = out
        work.report["reconstruct"] = out

    def result(self) -> dict[str, Any]:
        return {"calibration_error": {str(k): v for k, v in sorted(self.layers.items())}}
