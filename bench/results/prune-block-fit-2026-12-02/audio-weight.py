"""Experiment (issue 10, third pass): `omniedge compress` with the fit's token weights after the modality balance
multiplied by 2 for audio positions (text 1 : image 1 : audio 2 in total). Not a recipe option.

    python3 audio-weight.py compress omni-mini -o CKPT --recipe RECIPE.yaml
"""

from __future__ import annotations

import sys

import torch

from omniedge.cli import main
from omniedge.compress import reconstruct
from omniedge.models.family import MODALITIES

AUDIO = MODALITIES.index("audio")
balanced = reconstruct.token_weights


def audio_twice(
    y: torch.Tensor, how: str, modality: torch.Tensor | None = None, resid_sq: torch.Tensor | None = None
) -> torch.Tensor:
    c = balanced(y, how, modality, resid_sq)
    if modality is not None:
        c = c * torch.where(modality.long().to(c.device) == AUDIO, 2.0, 1.0)
    return c


reconstruct.token_weights = audio_twice  # type: ignore[assignment]
sys.exit(main(sys.argv[1:]))
