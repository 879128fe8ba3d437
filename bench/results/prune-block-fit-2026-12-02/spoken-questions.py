"""Experiment (issue 10, fourth pass): `omniedge compress` with omni-mini-data's audio calibration requests half
transcription rows, half spoken questions about an image (the data set's `mixed` train rows). Written before
the recipe option `calibration.mix: {image+audio: ...}` existed; that option draws the same kinds of request
(other draws of the seeded generator).

    python3 spoken-questions.py compress omni-mini -o CKPT --recipe RECIPE.yaml
"""

from __future__ import annotations

import sys
from typing import Any

from omniedge.cli import main
from omniedge.compress import calibration_data as cd
from omniedge.compress.calibration import _SOURCES, SAMPLE_RATE, Request

original = cd.dataset_requests


def with_spoken(kind: str, n: int, settings: Any, rng: Any, split: str, size: str = "full") -> list[Request]:
    if kind != "audio":
        return original(kind, n, settings, rng, split, size)
    from omniedge.data.build import build_dataset, load_split
    from omniedge.runtime.media import load_audio, load_image

    half = n // 2
    out = original(kind, n - half, settings, rng, split, size)
    root = build_dataset(size=size, seed=0)
    part = "test" if split == "heldout" else "train"
    for row in cd._pick(load_split(root, "mixed", part), half, rng, "mixed"):
        wav = load_audio(root / row["audio"], SAMPLE_RATE, max_seconds=30)
        out.append(Request(row["prompt"], row["answer"], image=load_image(root / row["image"]), audio=wav))
    return out


_SOURCES["omni-mini-data"] = with_spoken
sys.exit(main(sys.argv[1:]))
