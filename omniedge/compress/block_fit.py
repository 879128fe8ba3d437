"""Re-fit every weight of a pruned MoE block (router, gate/up and down projections of the kept experts) to
the unpruned block's output on the teacher's calibration tokens, by gradient descent.

`reconstruct` with `fit: down` (omniedge.compress.reconstruct) solves for the kept experts' down projections
only, in closed form: the kept experts still compute the features they were trained to compute, and the
router still picks among them by logits trained for a block of E experts. `fit: block` then lets the kept
experts take over what the removed ones did: it minimises the same token-weighted squared error,

    sum_x c_x ||block(x) - y_teacher(x)||^2 / sum_x c_x ||y_teacher(x)||^2,

over all three weights with Adam on mini-batches of calibration tokens. The block's own forward
(transformers' router and experts, through `torch.func.functional_call`) computes it, so what is fitted is
what the exported model runs; the top-k choice is not differentiable, the router's weights of the chosen
experts are. Every fifth token is held out: the weights kept are those with the lowest held-out error seen
at any check (the starting weights included, so the fit never makes the held-out error worse).

Like the down-projection re-fit, this is a per-layer reconstruction against the teacher's own inputs of the
layer and its MoE output on them (no labels, no other layer involved), a calibration step as GPTQ's is; a
quantize stage after it quantizes the fitted weights. It is not distillation of the model
(omniedge.distill), which trains every layer together on the teacher's output distribution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call

WEIGHTS = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")


def _error(
    block: Any, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """The token-weighted relative squared error of the block with `params` on tokens x [T, H]."""
    out = functional_call(block, params, (x[None],))[0]
    return (c * (out - y).square().sum(-1)).sum() / (c * y.square().sum(-1)).sum().clamp_min(1e-30)


def fit_block(
    block: Any,
    x: torch.Tensor,
    y_teacher: torch.Tensor,
    c: torch.Tensor,
    steps: int,
    lr: float,
    batch_tokens: int,
    check_every: int = 25,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the block's WEIGHTS in place to y_teacher [T, H] on inputs x [T, H] with token weights c [T]
    (see the module docstring). Returns the held-out and fitted tokens' relative errors before and after,
    and the step whose weights were kept (0: the starting weights were best)."""
    held = torch.arange(x.shape[0], device=x.device) % 5 == 4
    # clones made outside inference mode: the recorded rows and the pruned weights may be inference tensors
    with torch.inference_mode(False), torch.enable_grad():  # also when called under no_grad
        xf, yf, cf = (t[~held].float().clone() for t in (x, y_teacher, c))
        xv, yv, cv = (t[held].float().clone() for t in (x, y_teacher, c))
        own = dict(block.named_parameters())
        start = {k: own[k].detach().float().clone() for k in WEIGHTS}
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}

        def held_out(p: dict[str, torch.Tensor]) -> float:
            with torch.no_grad():
                return float(_error(block, p, xv, yv, cv))

        with torch.no_grad():
            fitted_before = float(_error(block, start, xf, yf, cf))
        best_err, best_step, best = held_out(start), 0, start
        before = best_err
        opt = torch.optim.Adam(list(params.values()), lr=lr)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = xf.shape[0]
        for step in range(1, steps + 1):
            idx = torch.randint(n, (min(batch_tokens, n),), generator=gen).to(xf.device)
            loss = _error(block, params, xf[idx], yf[idx], cf[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % check_every == 0 or step == steps:
                err = held_out(params)
                if err < best_err:
                    best_err, best_step = err, step
                    best = {k: v.detach().clone() for k, v in params.items()}
        with torch.no_grad():
            fitted_after = float(_error(block, best, xf, yf, cf))
    with torch.inference_mode():
        for k in WEIGHTS:
            own[k].data.copy_(best[k].to(own[k].dtype))
    return {
        "held_out_before": round(before, 6),
        "held_out_after": round(best_err, 6),
        "fitted_before": round(fitted_before, 6),
        "fitted_after": round(fitted_after, 6),
        "kept_step": best_step,
        "steps": steps,
    }
