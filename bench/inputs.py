"""Deterministic benchmark inputs: timings do not depend on content, but runs must be comparable."""

from __future__ import annotations

import numpy as np


def bench_image(side: int = 448, seed: int = 0) -> np.ndarray:
    """An RGB uint8 scene of coloured rectangles on a gradient, `side` x `side`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x * 255 // side, y * 255 // side, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    for _ in range(6):
        x0, y0 = rng.integers(0, side * 3 // 4, size=2)
        w, h = rng.integers(side // 10, side // 3, size=2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return img


def bench_audio(seconds: float = 5.0, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speech-like float32 mono audio: voiced harmonics with a moving pitch, syllable envelope, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    wav = 0.2 * voice * envelope + 0.01 * rng.standard_normal(t.size)
    return wav.astype(np.float32)
