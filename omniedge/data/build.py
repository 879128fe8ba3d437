"""Build the omni-mini dataset: text, images, speech and mixed tasks, deterministic from a seed, cached.

The cache directory is named by a hash of the builder settings (size, seed, builder version), under
omniedge.paths.home()/data; it is built in a temporary sibling and renamed (omniedge.atomic), so a
finished directory with a manifest.json is always complete. The layout is documented in docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.data import scenes, speech
from omniedge.data.provenance import licences, tools
from omniedge.data.sources import SOURCES, read_docs
from omniedge.data.text_corpus import (
    SPLITS,
    TextDoc,
    dedupe_sentences,
    speech_sentences,
    split_corpus,
    split_of,
    unit_hash,
    vocabulary,
)
from omniedge.data.writers import MelShards, flac_bytes, save_png, write_jsonl
from omniedge.errors import OmniedgeError
from omniedge.outputs import DATASET, check_replaceable
from omniedge.paths import home
from omniedge.prompts import MIXED_PROMPT

BUILDER_VERSION = 3  # 3: espeak-ng 1.52 in process (espeakng-loader) + scipy resampling, no apt/sox
TASKS = ("text", "image", "speech", "mixed")
MIXED_TASKS = ("count", "colour", "shape", "where")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the dataset's content; its hash names the cache directory."""

    size: str
    text_chars: dict[str, int]  # per source and split
    speech: dict[str, int]  # utterances per split
    scenes: dict[str, int]  # rendered scenes per split
    photo_crops: dict[str, int]  # crops per photo per split
    mixed: dict[str, int]  # spoken questions about scenes per split
    vocab_size: int = 2000  # speech sentences use only the most frequent training words
    image_size: int = scenes.IMAGE_SIZE
    shard_mib: int = 48
    sources: tuple[str, ...] = field(default_factory=lambda: tuple(SOURCES))


SIZES: dict[str, BuildConfig] = {
    "small": BuildConfig(
        "small",
        text_chars={"train": 40_000, "val": 8_000, "test": 8_000},
        speech={"train": 48, "val": 12, "test": 12},
        scenes={"train": 64, "val": 16, "test": 16},
        photo_crops={"train": 2, "val": 1, "test": 1},
        mixed={"train": 16, "val": 8, "test": 8},
    ),
    "full": BuildConfig(
        "full",
        text_chars={"train": 4_000_000, "val": 250_000, "test": 250_000},
        speech={"train": 6000, "val": 400, "test": 400},
        scenes={"train": 8000, "val": 500, "test": 500},
        photo_crops={"train": 40, "val": 5, "test": 5},
        mixed={"train": 1500, "val": 300, "test": 300},
    ),
}


def settings(size: str, seed: int) -> dict[str, Any]:
    if size not in SIZES:
        raise OmniedgeError(f"unknown dataset size {size!r}", f"use one of {sorted(SIZES)}")
    return {"builder_version": BUILDER_VERSION, "seed": seed, "config": asdict(SIZES[size])}


def settings_hash(size: str, seed: int) -> str:
    return hashlib.sha256(json.dumps(settings(size, seed), sort_keys=True).encode()).hexdigest()[:12]


def default_dir(size: str = "full", seed: int = 0) -> Path:
    return home() / "data" / f"omni-mini-{size}-s{seed}-{settings_hash(size, seed)}"


def build_dataset(out: Path | None = None, size: str = "full", seed: int = 0) -> Path:
    """Build (or reuse) the dataset and return its directory."""
    h = settings_hash(size, seed)
    out = Path(out) if out is not None else default_dir(size, seed)
    try:
        old = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        old = {}
    if isinstance(old, dict) and old.get("settings_hash") == h:
        return out
    check_replaceable(out, DATASET)
    speech.require_tools()
    started = time.perf_counter()
    with atomic_dir(out, DATASET) as tmp:
        _Builder(tmp, SIZES[size], seed).run(started, h)
    return out


def load_split(root: str | os.PathLike[str], task: str, split: str) -> list[dict[str, Any]]:
    """Rows of `<root>/<task>/<split>.jsonl`; paths inside rows are relative to `root`."""
    if task not in TASKS or split not in SPLITS:
        raise OmniedgeError(f"no task/split {task}/{split}", f"task is one of {TASKS}, split one of {SPLITS}")
    path = Path(root) / task / f"{split}.jsonl"
    if not path.exists():
        raise OmniedgeError(
            f"{path} not found", "build the dataset first: omniedge.data.build.build_dataset()"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


_STREAM = {"text": 1, "scenes": 2, "photos": 3, "speech": 4, "mixed": 5, "noise": 6}
_SPLIT_ID = {s: i for i, s in enumerate(SPLITS)}


class _Builder:
    def __init__(self, root: Path, cfg: BuildConfig, seed: int) -> None:
        self.root, self.cfg, self.seed = root, cfg, seed
        self.counts: dict[str, dict[str, int]] = {t: {} for t in TASKS}
        self.stats: dict[str, Any] = {}
        self.workers = max(1, min(8, os.cpu_count() or 1))

    def run(self, started: float, h: str) -> None:
        docs = self.text()
        self.images()
        self.speech(docs)
        self.mixed()
        self.manifest(started, h)

    # ---- text -------------------------------------------------------------------------------------
    def text(self) -> dict[str, list[TextDoc]]:
        by_split: dict[str, list[TextDoc]] = {s: [] for s in SPLITS}
        for name in tqdm(self.cfg.sources, desc="text sources", unit="source"):
            part = split_corpus(read_docs(name), self.seed, self.cfg.text_chars)
            for s in SPLITS:
                by_split[s].extend(part[s])
        by_split = dedupe_sentences(by_split)
        chars: dict[str, dict[str, int]] = {}
        for s in SPLITS:
            rows = ({"text": d.text, "source": d.source, "doc": d.doc_id} for d in by_split[s])
            self.counts["text"][s] = write_jsonl(self.root / "text" / f"{s}.jsonl", rows)
            chars[s] = {
                src: sum(len(d.text) for d in by_split[s] if d.source == src) for src in self.cfg.sources
            }
        self.stats["text_chars"] = chars
        return by_split

    # ---- images -----------------------------------------------------------------------------------
    def images(self) -> None:
        self.scene_rows: dict[str, list[dict[str, Any]]] = {}
        layouts = self._layouts()
        for s in SPLITS:
            rows: list[dict[str, Any]] = []
            drawn: list[dict[str, Any]] = []
            rng = _rng(self.seed, _STREAM["scenes"], _SPLIT_ID[s])
            for i, layout in enumerate(tqdm(layouts[s], desc=f"scenes {s}", unit="img", leave=False)):
                img, placed = scenes.render(layout, rng, self.cfg.image_size)
                rel = f"image/scenes/{s}/{i:05d}.png"
                save_png(img, self.root / rel)
                key = scenes.layout_key(layout)
                drawn.append({"image": rel, "layout": key, "objects": [asdict(p) for p in placed]})
                for task, prompt, answer in scenes.questions(layout):
                    rows.append(
                        {"image": rel, "prompt": prompt, "answer": answer, "task": task, "layout": key}
                    )
            write_jsonl(self.root / "image" / f"{s}.scenes.jsonl", drawn)
            self.scene_rows[s] = rows
            photo_rows = self._photos(s)
            self.counts["image"][s] = write_jsonl(self.root / "image" / f"{s}.jsonl", rows + photo_rows)
        self.stats["image_tasks"] = {
            s: dict(sorted(_count(r["task"] for r in load_split(self.root, "image", s)).items()))
            for s in SPLITS
        }

    def _layouts(self) -> dict[str, list[scenes.Layout]]:
        """Sample distinct layouts; each layout's split is a pure function of (seed, layout)."""
        want, got = self.cfg.scenes, {s: [] for s in SPLITS}
        seen: set[str] = set()
        rng = _rng(self.seed, _STREAM["scenes"], 99)
        for _ in range(200 * sum(want.values()) + 1000):
            if all(len(got[s]) >= want[s] for s in SPLITS):
                break
            layout = scenes.sample_layout(rng)
            key = scenes.layout_key(layout)
            s = split_of(unit_hash(self.seed, "layout", key), val=0.1, test=0.1)
            if key not in seen and len(got[s]) < want[s]:
                seen.add(key)
                got[s].append(layout)
        return got

    def _photos(self, split: str) -> list[dict[str, Any]]:
        rows = []
        rng = _rng(self.seed, _STREAM["photos"], _SPLIT_ID[split])
        for name, caption in scenes.PHOTOS.items():
            photo = scenes.load_photo(name)
            for i in range(self.cfg.photo_crops[split]):
                rel = f"image/photos/{split}/{name}-{i:03d}.png"
                save_png(scenes.photo_crop(photo, rng, self.cfg.image_size), self.root / rel)
                rows.append(
                    {
                        "image": rel,
                        "prompt": "what is in the photo?",
                        "answer": caption,
                        "task": "photo",
                        "photo": name,
                    }
                )
        return rows

    # ---- speech -----------------------------------------------------------------------------------
    def speech(self, docs: dict[str, list[TextDoc]]) -> None:
        vocab = vocabulary(docs["train"], self.cfg.vocab_size)
        pools = {s: speech_sentences(docs[s], vocab) for s in SPLITS}
        pools["val"] = [x for x in pools["val"] if x not in set(pools["train"])]
        pools["test"] = [x for x in pools["test"] if x not in set(pools["train"]) | set(pools["val"])]
        self.stats["speech_sentence_pool"] = {s: len(p) for s, p in pools.items()}
        for s in SPLITS:
            rng = _rng(self.seed, _STREAM["speech"], _SPLIT_ID[s])
            pool = pools[s]
            if not pool:
                raise OmniedgeError(
                    f"no speech sentences for split {s}", "use a larger size or more text sources"
                )
            order = rng.permutation(len(pool))[: self.cfg.speech[s]]
            jobs = [(pool[int(j)], speech.sample_voice(rng, s), {"text": pool[int(j)]}) for j in order]
            self.counts["speech"][s] = self._synth_split("speech", s, jobs)

    def _synth_split(
        self, task: str, split: str, jobs: list[tuple[str, speech.Voice, dict[str, Any]]]
    ) -> int:
        """Synthesise jobs in threads (espeak-ng runs one at a time, features overlap), write audio, mel shards and rows."""
        shards = MelShards(self.root, task, split, self.cfg.shard_mib * 2**20)
        stream = [self.seed, _STREAM["noise"], _SPLIT_ID[split], TASKS.index(task)]

        def work(i: int) -> tuple[np.ndarray, np.ndarray]:
            text, voice, _ = jobs[i]
            audio = speech.synthesize(text, voice, noise_seed=[*stream, i])
            return audio, speech.log_mel(audio)

        rows = []
        with ThreadPoolExecutor(self.workers) as pool:
            results = pool.map(work, range(len(jobs)))
            for i, (audio, mel) in enumerate(
                tqdm(results, total=len(jobs), desc=f"{task} {split}", unit="utt", leave=False)
            ):
                _, voice, fields = jobs[i]
                rel = f"{task}/audio/{split}/{i:05d}.flac"
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.root / rel).write_bytes(flac_bytes(audio))
                v = voice.as_dict()
                row = {"audio": rel, **fields}
                row.update(voice=v["voice"], speed=v["speed"], pitch=v["pitch"], noise_db=v["noise_db"])
                row.update(gain_db=v["gain_db"], seconds=round(len(audio) / speech.SAMPLE_RATE, 4))
                row.update(shards.add(i, mel))
                rows.append(row)
        shards.flush()
        self.stats.setdefault("audio_seconds", {}).setdefault(task, {})[split] = round(
            sum(r["seconds"] for r in rows), 1
        )
        return write_jsonl(self.root / task / f"{split}.jsonl", rows)

    # ---- mixed: a spoken question about a rendered scene ------------------------------------------
    def mixed(self) -> None:
        for s in SPLITS:
            rng = _rng(self.seed, _STREAM["mixed"], _SPLIT_ID[s])
            candidates = [r for r in self.scene_rows[s] if r["task"] in MIXED_TASKS]
            picks = [candidates[int(j)] for j in rng.integers(0, len(candidates), self.cfg.mixed[s])]
            jobs = []
            for r in picks:
                question = r["prompt"].rstrip("?")
                fields = {
                    "image": r["image"],
                    "prompt": MIXED_PROMPT,
                    "answer": r["answer"],
                    "question": question,
                }
                jobs.append(
                    (
                        question,
                        speech.sample_voice(rng, s),
                        {**fields, "task": r["task"], "layout": r["layout"]},
                    )
                )
            self.counts["mixed"][s] = self._synth_split("mixed", s, jobs)

    # ---- manifest ---------------------------------------------------------------------------------
    def manifest(self, started: float, h: str) -> None:
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        digests = {
            p.relative_to(self.root).as_posix(): _sha256(p)
            for p in tqdm(files, desc="hashing", unit="file", leave=False)
        }
        content = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in digests.items()).encode()).hexdigest()
        sizes: dict[str, int] = {}
        for rel in digests:
            top = (
                rel.split("/")[0]
                if "/mel/" not in rel and "/audio/" not in rel
                else "/".join(rel.split("/")[:2])
            )
            sizes[top] = sizes.get(top, 0) + (self.root / rel).stat().st_size
        atomic_write_json(
            self.root / "manifest.json",
            {
                "name": "omni-mini-data",
                "builder_version": BUILDER_VERSION,
                "size": self.cfg.size,
                "seed": self.seed,
                "settings_hash": h,
                "settings": asdict(self.cfg),
                "counts": self.counts,
                "stats": self.stats,
                "image_size": [self.cfg.image_size, self.cfg.image_size],
                "audio": {
                    "sample_rate": speech.SAMPLE_RATE,
                    "format": "FLAC PCM_16 mono",
                    "mel": {
                        "n_mels": speech.N_MELS,
                        "n_fft": 400,
                        "hop_length": speech.HOP,
                        "dtype": "float16",
                        "layout": "[frames, n_mels] per shard; index.npy rows = (jsonl row, start, frames)",
                    },
                },
                "voices": {s: list(v) for s, v in speech.VARIANTS.items()},
                "accents": list(speech.ACCENTS),
                "sources": licences(),
                "tools": tools(),
                "bytes": dict(sorted(sizes.items())),
                "content_sha256": content,
                "files_sha256": {k: v for k, v in digests.items() if k.endswith((".jsonl", ".npy"))},
                "build_seconds": round(time.perf_counter() - started, 1),
            },
        )


def _count(items: Iterator[str] | Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()
