"""Experiment (issue 10, third pass): `omniedge compress` with the block fit's error measured through the lm_head,
delta_y^T G delta_y with G = (W diag(g))^T (W diag(g)) (W the lm_head, g the final norm's weight, the per-token
RMS ignored), for both MoE layers, instead of the plain squared error. Not a recipe option.

    python3 lm-head-metric.py compress omni-mini -o CKPT --recipe RECIPE.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.func import functional_call

from omniedge.cli import main
from omniedge.compress import block_fit

MODEL = Path(__file__).resolve().parents[3] / "omniedge" / "models" / "omni_mini" / "model.safetensors"
with safe_open(str(MODEL), "pt") as f:
    head = (
        f.get_tensor("thinker.lm_head.weight").double()
        * f.get_tensor("thinker.model.norm.weight").double()[None]
    )
gram = head.T @ head
gram = gram / gram.diagonal().mean()
factor = torch.linalg.cholesky(gram + 1e-6 * torch.eye(gram.shape[0], dtype=gram.dtype)).float()


def error_through_head(block: Any, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # fmt: skip
    out = functional_call(block, params, (x[None],))[0]
    f = factor.to(x.device)
    return (c * ((out - y) @ f).square().sum(-1)).sum() / (c * (y @ f).square().sum(-1)).sum().clamp_min(
        1e-30
    )


block_fit._error = error_through_head  # type: ignore[assignment]
sys.exit(main(sys.argv[1:]))
