"""Endless training batches, made in worker processes: pack examples for text and images, fresh speech
(omniedge.training.synth) for speech and spoken questions, augmented log-mel, precomputed M-RoPE positions.

Worker k of a stream seeded (seed, phase, first step) draws from its own generator; the loader reads the
workers round robin, so the batch sequence depends only on those numbers and the worker count (all
recorded in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from omniedge.training.batches import ChatTokens, Example, collate

TRAIN_TASKS = ("text", "image", "speech", "mixed")


@dataclass(frozen=True)
class StreamSpec:
    """What one phase's batches hold and how speech is varied."""

    batch: dict[str, int]  # examples per task per step
    words_fraction: tuple[float, float] = (0.0, 0.0)  # random-word utterances: share at step 0 -> at the end
    curriculum_steps: int = 1  # steps over which words_fraction moves from its start to its end
    spec_augment: bool = True
    speed_perturb: tuple[float, float] = (0.9, 1.1)
    vtlp: tuple[float, float] = (0.9, 1.1)  # mel-axis warp: a cheap stand-in for unseen voices

    def words_at(self, step: int) -> float:
        a, b = self.words_fraction
        return a + (b - a) * min(1.0, step / max(1, self.curriculum_steps))


def augment_mel(
    mel: np.ndarray,
    rng: np.random.Generator,
    speed: tuple[float, float],
    vtlp: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Speed perturbation (time resampling), vocal-tract-length perturbation (mel-axis warp), SpecAugment."""
    n_mels, frames = mel.shape
    alpha = rng.uniform(*vtlp)
    if alpha != 1.0:
        src = np.clip(np.arange(n_mels) / alpha, 0, n_mels - 1)
        j0 = np.floor(src).astype(int)
        j1 = np.minimum(j0 + 1, n_mels - 1)
        wf = (src - j0).astype(np.float32)[:, None]
        mel = mel[j0] * (1 - wf) + mel[j1] * wf
    factor = rng.uniform(*speed)
    new = max(8, round(frames / factor))
    pos = np.linspace(0, frames - 1, new)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, frames - 1)
    w = (pos - i0).astype(np.float32)
    out = mel[:, i0] * (1 - w) + mel[:, i1] * w
    fill = float(out.mean())
    for _ in range(2):
        width = int(rng.integers(0, 16))
        start = int(rng.integers(0, n_mels - width + 1))
        out[start : start + width] = fill
    for _ in range(2):
        width = int(rng.integers(0, max(1, new // 12)))
        start = int(rng.integers(0, new - width + 1))
        out[:, start : start + width] = fill
    return out.astype(np.float32)


def draw_batch(
    ct: ChatTokens,
    data: dict[str, list[Example]],
    spec: StreamSpec,
    rng: np.random.Generator,
    maker: Any = None,
    step: int = 0,
) -> dict[str, Any]:
    """One step's examples (fixed count per task, augmented audio) collated with M-RoPE positions and
    CTC targets. With a SpeechMaker, speech and mixed examples are synthesised afresh."""
    picked: list[Example] = []
    for task in TRAIN_TASKS:
        n = spec.batch.get(task, 0)
        for _ in range(max(0, n)):
            if maker is not None and task == "speech":
                ex = maker.speech(rng, spec.words_at(step))
            elif maker is not None and task == "mixed":
                ex = maker.mixed(rng)
            elif data.get(task):
                ex = data[task][int(rng.integers(len(data[task])))]
            else:
                break
            if ex.mel is not None and spec.spec_augment:
                ex = replace(ex, mel=augment_mel(ex.mel, rng, spec.speed_perturb, spec.vtlp))
            picked.append(ex)
    batch = collate(ct, picked, positions=True, ctc=True)
    batch["task_of_row"] = [ex.task for ex in picked]
    return batch


def batch_stream(
    ct: ChatTokens,
    data: dict[str, list[Example]],
    spec: StreamSpec,
    seed: tuple[int, ...],
    first_step: int,
    workers: int,
    pin: bool,
    maker: Any = None,
) -> Iterator[dict[str, Any]]:
    """Endless batches from `workers` processes (the GIL stays with the training loop); 0: in process."""
    import torch

    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[dict[str, Any]]:
            info = torch.utils.data.get_worker_info()
            k, n = (info.id, info.num_workers) if info else (0, 1)
            rng = np.random.default_rng([*seed, first_step, k])
            j = 0
            while True:
                yield draw_batch(ct, data, spec, rng, maker, step=first_step + j * n + k)
                j += 1

    loader = torch.utils.data.DataLoader(
        Stream(),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,  # batches in flight: 2 per worker (in shared memory)
        persistent_workers=workers > 0,
        pin_memory=pin,
    )
    return iter(loader)
