"""Calibration requests drawn from the omni-mini data set: its train split for calibration, its test split
for the held-out requests. The model's own real text, images, speech and spoken questions about images
(`mix: {image+audio: ...}`), so pruning keeps the experts those inputs use (recipe: `calibration.source:
omni-mini-data`, or `omni-mini-data-small` for the seconds-to-build subset)."""

from __future__ import annotations

from typing import Any

import numpy as np

from omniedge.compress.calibration import SAMPLE_RATE, Request, register_source
from omniedge.errors import OmniedgeError
from omniedge.prompts import ASR_PROMPT, MIXED_PROMPT  # the prompts omni-mini was trained with

TEXT_CHARS = 1200  # a calibration text request: the first characters of a document


def _pick(rows: list[dict[str, Any]], n: int, rng: np.random.Generator, task: str) -> list[dict[str, Any]]:
    if not rows:
        raise OmniedgeError(
            f"the omni-mini data set has no {task} training rows", "rebuild it (omniedge.data)"
        )
    idx = rng.choice(len(rows), size=n, replace=n > len(rows))
    return [rows[int(i)] for i in idx]


def dataset_requests(
    kind: str, n: int, settings: dict[str, Any], rng: np.random.Generator, split: str, size: str = "full"
) -> list[Request]:
    from omniedge.data.build import build_dataset, load_split
    from omniedge.runtime.media import load_audio, load_image

    root = build_dataset(size=size, seed=0)  # cached after the first build
    part = "test" if split == "heldout" else "train"  # held out: the data set's own test split
    out: list[Request] = []
    if kind == "text":
        for row in _pick(load_split(root, "text", part), n, rng, "text"):
            out.append(Request("", row["text"][:TEXT_CHARS]))
    elif kind == "image":
        for row in _pick(load_split(root, "image", part), n, rng, "image"):
            out.append(Request(row["prompt"], row["answer"], image=load_image(root / row["image"])))
    elif kind == "audio":
        for row in _pick(load_split(root, "speech", part), n, rng, "speech"):
            wav = load_audio(root / row["audio"], SAMPLE_RATE, max_seconds=30)
            out.append(Request(ASR_PROMPT, row["text"], audio=wav))
    elif kind == "image+audio":  # a spoken question about an image (the data set's `mixed` task)
        for row in _pick(load_split(root, "mixed", part), n, rng, "spoken-question"):
            wav = load_audio(root / row["audio"], SAMPLE_RATE, max_seconds=30)
            image = load_image(root / row["image"])
            out.append(Request(row.get("prompt") or MIXED_PROMPT, row["answer"], image=image, audio=wav))
    else:
        raise OmniedgeError(f"unknown request kind {kind!r}", "use text, image, audio or image+audio")
    return out


register_source("omni-mini-data", dataset_requests)
register_source(
    "omni-mini-data-small",
    lambda kind, n, settings, rng, split: dataset_requests(kind, n, settings, rng, split, size="small"),
)
