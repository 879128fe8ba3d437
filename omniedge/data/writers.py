"""How the omni-mini data builder writes its files: JSON lines, PNG images, FLAC audio, log-mel shards."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from omniedge.data import speech


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
            n += 1
    return n


def save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)


def flac_bytes(audio: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, speech.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


class MelShards:
    """Log-mel features of one task/split in float16 .npy shards of at most `max_bytes` each."""

    def __init__(self, root: Path, task: str, split: str, max_bytes: int) -> None:
        self.root, self.prefix, self.max_bytes = root, f"{task}/mel/{split}", max_bytes
        self.k, self.feats, self.index, self.frames = 0, [], [], 0
        (root / task / "mel").mkdir(parents=True, exist_ok=True)

    def add(self, row: int, mel: np.ndarray) -> dict[str, Any]:
        if self.frames and (self.frames + len(mel)) * speech.N_MELS * 2 > self.max_bytes:
            self.flush()
        where = {
            "mel": f"{self.prefix}-{self.k:03d}.features.npy",
            "mel_start": self.frames,
            "mel_frames": len(mel),
        }
        self.feats.append(mel)
        self.index.append((row, self.frames, len(mel)))
        self.frames += len(mel)
        return where

    def flush(self) -> None:
        if not self.feats:
            return
        np.save(self.root / f"{self.prefix}-{self.k:03d}.features.npy", np.concatenate(self.feats))
        np.save(self.root / f"{self.prefix}-{self.k:03d}.index.npy", np.asarray(self.index, dtype=np.int64))
        self.k, self.feats, self.index, self.frames = self.k + 1, [], [], 0
