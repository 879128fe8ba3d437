"""The `reconstruct` stage: after pruning, re-fit the kept experts' down projections so that the MoE block's
output on the teacher's calibration tokens comes as close as least squares allows to the unpruned block's.

Pruning takes away experts whose share of a token's output then goes missing (the router renormalises over
the kept ones). The kept experts' intermediate activations h_e(x) = act(G_e x) * (U_e x) do not change, so
the block's output is linear in their down projections: y(x) = sum_e w_e(x) D_e h_e(x). The stage solves

    min over D  sum_x c_x ||y(x) - y_teacher(x)||^2 + sum_e lambda_e ||D_e - D_e0||^2

(c_x: each token's weight, set by `token_weight` and `balance_modalities`) by block coordinate descent over
the experts: each step is one ridge regression of an expert's [H, I] down projection given the others (exact
for that block; the objective falls at every step), `sweeps` passes over the layer's experts. The ridge term
pulls D_e towards its trained value, lambda_e = `damp` x the mean of the diagonal of that expert's Gram matrix
(as GPTQ damps its Hessian); `damp: auto` picks it from DAMP_GRID by the error on held-out calibration tokens,
or leaves the layer as it is when no fit beats that. With nothing pruned the teacher's weights are the exact
solution and come back unchanged.

This is a per-layer output reconstruction in the sense of GPTQ's, applied to what pruning changed: no
gradient, no labels, the teacher's calibration inputs of the layer (omniedge.compress.layer_inputs) and its
MoE output on them. A quantize stage after it quantizes the re-fitted weights. `fit: block` then fits the
router and every kept expert weight too, by gradient (omniedge.compress.block_fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from omniedge.compress.block_fit import fit_block
from omniedge.compress.layer_inputs import CHUNK_ROWS
from omniedge.compress.moe import route
from omniedge.compress.recipe import as_bool, as_choice, as_float, as_int, check_keys
from omniedge.compress.stages import LayerWork, ModelFacts, Stage
from omniedge.models.family import MODALITIES


@dataclass(frozen=True)
class ReconstructSettings:
    damp: float | str = "auto"  # ridge weight towards the trained weights, x the mean Gram diagonal; or auto
    sweeps: int = 3  # passes of block coordinate descent over the layer's experts
    token_weight: str = (
        "relative"  # each token's squared error: relative to its output, its residual, uniform
    )
    balance_modalities: bool = True  # text, image and audio positions each weigh the same in total
    fit: str = "down"  # down: the ridge re-fit above; block: then router + every kept expert weight by Adam
    steps: int = 400  # fit: block: Adam steps (the weights with the lowest held-out error are kept)
    lr: float = 3e-4  # fit: block: Adam's learning rate
    batch_tokens: int = 4096  # fit: block: calibration tokens per step
    last_layer: str = "all"  # text: the last decoder layer fits text positions only (LAST_LAYER_ROWS)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "reconstruct") -> ReconstructSettings:
        d = {**asdict(cls()), **check_keys(dict(raw or {}), asdict(cls()), where)}
        return cls(
            damp="auto" if d["damp"] == "auto" else as_float(d["damp"], f"{where}.damp", 0.0, 1e4),
            sweeps=as_int(d["sweeps"], f"{where}.sweeps"),
            token_weight=as_choice(d["token_weight"], f"{where}.token_weight", TOKEN_WEIGHTS),
            balance_modalities=as_bool(d["balance_modalities"], f"{where}.balance_modalities"),
            fit=as_choice(d["fit"], f"{where}.fit", FITS),
            steps=as_int(d["steps"], f"{where}.steps"),
            lr=as_float(d["lr"], f"{where}.lr", 1e-7, 1.0),
            batch_tokens=as_int(d["batch_tokens"], f"{where}.batch_tokens"),
            last_layer=as_choice(d["last_layer"], f"{where}.last_layer", LAST_LAYER_ROWS),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TOKEN_WEIGHTS = ("relative", "uniform", "residual")
FITS = ("down", "block")
# Which calibration rows the last decoder layer is fitted on. Its MoE output reaches nothing but the final
# norm and the lm_head at the same position, and the text model reads the lm_head's prediction only at text
# positions: at an image or audio position it is never used (the next position's input is the next patch or
# frame's embedding). `all` fits every row as in the other layers; `text` fits the text rows only, and
# `balance_modalities` then gives each request kind (text, image, audio, image+audio) the same total weight,
# so an audio request's prompt and transcript count as much as the text documents.
LAST_LAYER_ROWS = ("all", "text")
DAMP_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # `damp: auto` tries each (and no change) on held-out tokens


def token_weights(
    y: torch.Tensor, how: str, modality: torch.Tensor | None = None, resid_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """c_t per token [T]: `uniform` 1 (plain least squares: a few tokens with outputs of huge norm then
    outweigh all the others); `relative` 1 / (||y_t||^2 + mean ||y||^2), so that each token's error counts
    relative to its own output (the mean keeps near-zero outputs from dominating instead); `residual`
    1 / ||h_t + y_t||^2 (`resid_sq`), relative to the residual stream the output joins, which the next
    layer's RMSNorm divides by: an error counts by how much it moves what that layer reads. With `modality`
    [T], each modality present then gets the same total weight (a few hundred audio positions among thousands
    of text ones would otherwise barely count)."""
    if how == "uniform":
        c = torch.ones(y.shape[0], dtype=torch.float32, device=y.device)
    elif how == "residual":
        if resid_sq is None:
            raise ValueError("token weights `residual` need the residual stream's norms (resid_sq)")
        c = 1.0 / resid_sq.float().to(y.device).clamp_min(1e-30)
    else:
        sq = y.float().square().sum(-1)
        c = 1.0 / (sq + sq.mean().clamp_min(1e-30))
    if modality is not None:
        mod = modality.long().to(c.device)
        total = torch.zeros(int(mod.max()) + 1, dtype=c.dtype, device=c.device).index_add_(0, mod, c)
        share = c.sum() / int((total > 0).sum())  # each modality present ends with this total
        c = c * share / total[mod]
    return c


def _features(block: Any, x: torch.Tensor, tok: torch.Tensor, weight: torch.Tensor, e: int) -> torch.Tensor:
    """w_e(x) * act(G_e x) * (U_e x) for the tokens `tok` routed to expert e, float32 [n, I]."""
    experts = block.experts
    parts = []
    for c in range(0, tok.shape[0], CHUNK_ROWS):
        g, u = F.linear(x[tok[c : c + CHUNK_ROWS]], experts.gate_up_proj[e]).chunk(2, dim=-1)
        parts.append((experts.act_fn(g) * u).float() * weight[c : c + CHUNK_ROWS, None])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _spans(
    block: Any, x: torch.Tensor, top_k: int, normalise: bool, root: torch.Tensor
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, its tokens, their router weights x sqrt(c_t)) for every expert the router sends tokens to."""
    r = route(x, block.gate.weight, top_k, normalise)
    out = []
    for e, a, b in r.spans():
        tok = r.token[a:b]
        out.append((e, tok, r.weights[tok, r.slot[a:b]].float() * root[tok]))
    return out


def _residual(block: Any, x: torch.Tensor, y: torch.Tensor, spans: list, down: torch.Tensor) -> torch.Tensor:
    """y - the block's (token-weighted) output with down projections `down` [E, H, I]."""
    resid = y.clone()
    for e, tok, w in spans:
        resid.index_add_(0, tok, -(_features(block, x, tok, w, e) @ down[e].T))
    return resid


def _fit(
    block: Any, x: torch.Tensor, y: torch.Tensor, spans: list, trained: torch.Tensor, damp: float, sweeps: int
) -> torch.Tensor:
    """The down projections [E, H, I] that block coordinate descent reaches from `trained`."""
    current = trained.clone()
    resid = _residual(block, x, y, spans, current)
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
    return current


def _error(block: Any, x: torch.Tensor, y: torch.Tensor, spans: list, down: torch.Tensor) -> float:
    return float(_residual(block, x, y, spans, down).square().sum()) / (float(y.square().sum()) or 1.0)


def refit_down(
    block: Any,
    x: torch.Tensor,
    y_teacher: torch.Tensor,
    top_k: int,
    normalise: bool,
    damp: float | None,
    sweeps: int,
    token_weight: str = "relative",
    modality: torch.Tensor | None = None,
    resid_sq: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Re-fit `block.experts.down_proj` in place (see the module docstring) on tokens x [T, H] whose teacher
    MoE output is y_teacher [T, H]. `damp` None: chosen from DAMP_GRID by the error on every fifth token
    after fitting the other four fifths, or no change at all when that is best (then the final fit uses
    every token). Returns the (token-weighted) relative calibration error before and after, and the damp."""
    down = block.experts.down_proj  # [E, H, I]
    with torch.inference_mode():
        root = token_weights(y_teacher, token_weight, modality, resid_sq).sqrt()
        y = y_teacher.float() * root[:, None]
        trained = down.detach().float().clone()
        spans = _spans(block, x, top_k, normalise, root)
        before = _error(block, x, y, spans, trained)
        out: dict[str, Any] = {"error_before": round(before, 6)}
        if damp is None:
            held = torch.arange(x.shape[0], device=x.device) % 5 == 4
            parts = []
            for m in (~held, held):
                xs, rs = x[m], root[m]
                parts.append((xs, y[m], _spans(block, xs, top_k, normalise, rs)))
            (xf, yf, sf), (xv, yv, sv) = parts
            trials: dict[str, float] = {"none": _error(block, xv, yv, sv, trained)}
            for d in DAMP_GRID:
                trials[str(d)] = _error(block, xv, yv, sv, _fit(block, xf, yf, sf, trained, d, sweeps))
            best = min(trials, key=lambda k: trials[k])
            out["held_out_fifth"] = {k: round(v, 6) for k, v in trials.items()}
            damp = None if best == "none" else float(best)
            out["damp"] = best
        current = trained if damp is None else _fit(block, x, y, spans, trained, damp, sweeps)
        out["error_after"] = round(_error(block, x, y, spans, current), 6)
        down.data.copy_(current.to(down.dtype))
    out["experts"] = len(spans)
    return out


class ReconstructStage(Stage):
    name = "reconstruct"
    settings_type = ReconstructSettings
    settings: ReconstructSettings
    needs_inputs = True
    needs_moe_output = True

    def __init__(self, settings: ReconstructSettings, model: ModelFacts) -> None:
        super().__init__(settings, model)
        self.layers: dict[int, dict[str, Any]] = {}

    def apply(self, work: LayerWork) -> None:
        if not work.is_moe or work.inputs is None:
            return
        x, y, modality = work.inputs.moe_rows()
        s = self.settings
        resid_sq = work.inputs.residual_sq()  # concatenated once, for both fits
        kinds = work.inputs.request_kinds()
        if s.last_layer == "text" and self.model.is_last_layer(work.index) and kinds is not None:
            rows = modality == MODALITIES.index("text")
            x, y, modality = x[rows], y[rows], kinds[rows]  # groups for the balance: the request kinds
            resid_sq = resid_sq[rows] if resid_sq is not None else None
        modality = modality if s.balance_modalities else None
        out = refit_down(
            work.layer.mlp,
            x,
            y,
            work.top_k,
            work.normalise,
            None if s.damp == "auto" else float(s.damp),
            s.sweeps,
            s.token_weight,
            modality,
            resid_sq,
        )
        out["rows"] = int(x.shape[0])  # the calibration rows fitted (text rows only: `last_layer: text`)
        if s.fit == "block":
            c = token_weights(y, s.token_weight, modality, resid_sq)
            out["block"] = fit_block(work.layer.mlp, x, y, c, s.steps, s.lr, s.batch_tokens)
        self.layers[work.index] = out
        work.report["reconstruct"] = out

    def result(self) -> dict[str, Any]:
        return {"calibration_error": {str(k): v for k, v in sorted(self.layers.items())}}
