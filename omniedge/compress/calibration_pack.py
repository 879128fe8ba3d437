"""Calibration packs: real text, photos and speech for calibrating a real model, in a directory of a few MB.

A pack is `pack.json` (plus optional media files beside it). Built once where the project's text corpora
can be fetched (`python -m omniedge.compress.calibration_pack build DIR`), the project's pack ships inside
the package (`omniedge/compress/calibration-pack/`, 1.7 MB) to machines that cannot fetch anything: text is stored as text; photos are
named crops of scikit-image's bundled photos and rendered scenes (made again from their seeds); speech is
a (sentence, voice, noise seed) that `omniedge.data.speech.synthesize` speaks at compress time. Entries may
also point at files inside the pack (`{"file": "images/x.png"}`, `{"file": "audio/x.wav"}`).

Recipe: `calibration: {source: pack}` (the shipped pack; the default recipe's) or `{source: pack, path: <pack dir,
relative to the recipe file>}`. Two splits:
`calibration` (activations and statistics) and `heldout` (quality after each stage, never calibrated on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.compress.calibration import SAMPLE_RATE, SPLITS, Request, register_source
from omniedge.errors import OmniedgeError
from omniedge.models.family import MODALITIES
from omniedge.prompts import ASR_PROMPT

PACK_FILE = "pack.json"
DEFAULT_PACK = Path(__file__).with_name("calibration-pack")  # the project's pack, package data
FORMAT = "omniedge-calibration-pack"
VERSION = 1
PHOTO_PROMPT = "What is in the photo?"
TEXT_CHARS = 4000  # one text request: ~1000 tokens of Qwen's tokenizer


def read_pack(path: str | Path) -> dict[str, Any]:
    """The pack's pack.json, checked; a clear error for anything else."""
    p = Path(path)
    f = p / PACK_FILE
    if not f.is_file():
        raise OmniedgeError(
            f"calibration pack not found: {f}",
            "point calibration.path at a pack directory (python -m omniedge.compress.calibration_pack build DIR)",
        )
    try:
        pack = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise OmniedgeError(f"{f} is not valid JSON ({e})", "build the pack again") from e
    if pack.get("format") != FORMAT or pack.get("version") != VERSION:
        raise OmniedgeError(f"{f} is not a version-{VERSION} {FORMAT}", "build the pack again")
    return pack


def _image(entry: dict[str, Any], root: Path, size: int) -> np.ndarray:
    from PIL import Image

    from omniedge.data import scenes

    if "file" in entry:
        from omniedge.runtime.media import load_image

        img = Image.fromarray(load_image(root / entry["file"]))
        return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
    if "photo" in entry:
        photo = scenes.load_photo(entry["photo"])
        return np.asarray(scenes.photo_crop(photo, np.random.default_rng(entry["crop_seed"]), size))
    rng = np.random.default_rng(entry["scene_seed"])
    img, _ = scenes.render(scenes.sample_layout(rng), rng, size)
    return np.asarray(img)


def _audio(entry: dict[str, Any], root: Path) -> np.ndarray:
    if "file" in entry:
        from omniedge.runtime.media import load_audio

        return load_audio(root / entry["file"], SAMPLE_RATE, max_seconds=30)
    from omniedge.data import speech

    sp = entry["speech"]
    try:
        x = speech.synthesize(sp["text"], speech.Voice(**sp["voice"]), sp["noise_seed"])
    except OmniedgeError as e:
        raise OmniedgeError(
            f"the calibration pack's speech is synthesised at compress time, and that failed: {e.problem}",
            e.fix or "install the speech synthesiser, or set the recipe's audio share to 0",
        ) from e
    return (x.astype(np.float32) / 32768.0)[: 30 * SAMPLE_RATE]


def pack_requests(
    kind: str, n: int, settings: dict[str, Any], rng: np.random.Generator, split: str
) -> list[Request]:
    """The first `n` requests of one modality and split of the pack at `settings["path"]` (default: the
    shipped pack)."""
    root = Path(settings["path"]) if settings.get("path") else DEFAULT_PACK
    entries = [e for e in read_pack(root)["splits"].get(split, []) if e["kind"] == kind]
    if len(entries) < n:
        raise OmniedgeError(
            f"calibration pack {root} has {len(entries)} {kind} requests in its {split} split; the recipe "
            f"asks for {n}",
            f"lower the {kind} count (calibration.samples x mix, or measure.*), or build a bigger pack",
        )
    out = []
    for e in entries[:n]:
        if kind == "text":
            out.append(Request(e.get("prompt", ""), e["reply"]))
        elif kind == "image":
            out.append(
                Request(e["prompt"], e["reply"], image=_image(e["image"], root, int(settings["image_size"])))
            )
        else:
            out.append(Request(e["prompt"], e["reply"], audio=_audio(e["audio"], root)))
    return out


register_source("pack", pack_requests)


# ---------------------------------------------------------------- building a pack


def _text_entries(docs: list[Any], n: int) -> list[dict[str, Any]]:
    """Consecutive documents joined up to TEXT_CHARS, so each request is about as long as the budget."""
    out: list[dict[str, Any]] = []
    parts: list[str] = []
    names: list[str] = []
    for d in docs:
        if len(out) >= n:
            break
        parts.append(d.text)
        names.append(f"{d.source}/{d.doc_id}")
        if sum(len(p) for p in parts) >= TEXT_CHARS:
            out.append(
                {"kind": "text", "prompt": "", "reply": "\n\n".join(parts)[:TEXT_CHARS], "from": names}
            )
            parts, names = [], []
    return out


def _image_entries(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Half photo crops (scikit-image), half rendered scenes with a checkable question each."""
    from omniedge.data import scenes

    out: list[dict[str, Any]] = []
    photos = list(scenes.PHOTOS.items())
    for i in range(n):
        seed = int(rng.integers(2**31))
        if i % 2 == 0:
            name, caption = photos[(i // 2) % len(photos)]
            out.append(
                {
                    "kind": "image",
                    "prompt": PHOTO_PROMPT,
                    "reply": caption,
                    "image": {"photo": name, "crop_seed": seed},
                }
            )
        else:
            layout = scenes.sample_layout(np.random.default_rng(seed))
            qs = scenes.questions(layout)
            _, prompt, answer = qs[int(rng.integers(len(qs)))]
            out.append({"kind": "image", "prompt": prompt, "reply": answer, "image": {"scene_seed": seed}})
    return out


def _audio_entries(
    sentences: list[str], n: int, rng: np.random.Generator, voices: str
) -> list[dict[str, Any]]:
    from omniedge.data import speech

    out = []
    for s in sentences[:n]:
        v = speech.sample_voice(rng, voices)
        out.append(
            {
                "kind": "audio",
                "prompt": ASR_PROMPT,
                "reply": s,
                "audio": {
                    "speech": {"text": s, "voice": v.as_dict(), "noise_seed": int(rng.integers(2**31))}
                },
            }
        )
    return out


def build_pack(out: str | Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """Write a pack with counts[split][kind] requests from the project's text corpora (omniedge.data),
    scikit-image photos, rendered scenes and synthesised-speech specs; atomically. Returns `out`."""
    from omniedge.atomic import atomic_dir, atomic_write_json
    from omniedge.data.sources import SOURCES, read_docs
    from omniedge.data.text_corpus import dedupe_sentences, normalise_sentence, sentences_of, split_corpus
    from omniedge.outputs import CALIBRATION_PACK

    budget = {"train": 2_000_000, "val": 0, "test": 400_000}
    by_split: dict[str, list[Any]] = {"train": [], "val": [], "test": []}
    for name in SOURCES:
        part = split_corpus(read_docs(name), seed, budget)
        for s in by_split:
            by_split[s].extend(part[s])
    by_split = dedupe_sentences(by_split)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, corpus, voices in (("calibration", "train", "train"), ("heldout", "test", "test")):
        docs = list(by_split[corpus])
        rng.shuffle(docs)
        want = counts.get(split, {})
        sentences = []
        for d in docs:
            for raw in sentences_of(d.text):
                s = normalise_sentence(raw)
                if s and 4 <= len(s.split()) <= 20:
                    sentences.append(s[:1].upper() + s[1:] + ".")
        splits[split] = (
            _text_entries(docs, want.get("text", 0))
            + _image_entries(want.get("image", 0), rng)
            + _audio_entries(sentences[::7], want.get("audio", 0), rng, voices)
        )
        for kind in MODALITIES:
            got = sum(1 for e in splits[split] if e["kind"] == kind)
            if got < want.get(kind, 0):
                raise OmniedgeError(f"only {got} {kind} requests for the {split} split", "ask for fewer")
    pack = {
        "format": FORMAT,
        "version": VERSION,
        "seed": seed,
        "made_by": "python -m omniedge.compress.calibration_pack build",
        "sources": {
            "text": {n: {"package": s.package, "licence": s.licence} for n, s in SOURCES.items()},
            "image": "scikit-image bundled photos (omniedge.data.scenes.PHOTOS) and rendered scenes",
            "audio": "espeak-ng speech of corpus sentences (omniedge.data.speech.synthesize), made at compress time",
        },
        "counts": {
            s: {k: sum(1 for e in es if e["kind"] == k) for k in MODALITIES} for s, es in splits.items()
        },
        "splits": splits,
    }
    with atomic_dir(Path(out), CALIBRATION_PACK) as tmp:
        atomic_write_json(tmp / PACK_FILE, pack)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omniedge.compress.calibration_pack")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a calibration pack from the project's data sources")
    b.add_argument("out", type=Path)
    for split, defaults in (("calibration", (320, 96, 96)), ("heldout", (24, 12, 12))):
        for kind, d in zip(MODALITIES, defaults, strict=True):
            b.add_argument(f"--{split}-{kind}", type=int, default=d, help=f"{kind} requests ({split})")
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts = {s: {k: getattr(args, f"{s}_{k}") for k in MODALITIES} for s in SPLITS}
    print(build_pack(args.out, counts, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
