"""The compact training pack: tokenized examples with precomputed features, small enough to carry to a GPU.

The GPU machine cannot synthesise or decode audio, so features are computed here once, by the same code
the evaluation uses, and stored compactly: each picture once (as resized uint8; patchify is an exact
reshape) however many questions ask about it, and log-mel quantized per utterance to `mel_levels`
levels between its min and max (16 by default: one step is 1/15 of a range that Whisper's
normalisation caps at 2; training dithers it back). One `<task>_<split>.npz.xz` (npz in LZMA) per task
split, plus tokenizer.json and pack.json.

Speech for training is synthesised where the training runs (omniedge.training.synth), so by default the
pack holds no training audio: it carries what that speech says instead (omniedge.data.speech_corpus:
the training sentences and clauses, the vocabulary, and the held-out texts they exclude), xz text files
of about 1 MB in all. Validation audio (held-out voices) is packed as log-mel as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.errors import OmniedgeError
from omniedge.outputs import TRAINING_PACK
from omniedge.training.batches import (
    N_MELS,
    Example,
    load_rgb,
    load_wave,
    log_mel,
    media_path,
    patchify,
    read_records,
    record_text,
    resize_image,
    text_examples,
)

PACK_SCHEMA = 2  # 2: speech text lists instead of training audio
SYNTHESISED = ("speech", "mixed")  # tasks whose training examples are synthesised while training
MEDIA_TASKS = ("image", "speech", "mixed")


def _ragged(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(seqs) + 1, np.int64)
    off[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), np.int32, count=int(off[-1]))
    return flat, off


def _unragged(flat: np.ndarray, off: np.ndarray) -> list[list[int]]:
    return [flat[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]


def _text_arrays(tok: Any, records: list[dict[str, Any]], max_len: int) -> dict[str, np.ndarray]:
    exs = text_examples(tok, records, max_len)
    flat, off = _ragged([e.answer for e in exs])
    dtype = np.int16 if tok.get_vocab_size() < 2**15 else np.int32
    return {"tokens": flat.astype(dtype), "offsets": off, "groups": np.array([e.group for e in exs])}


def _media_arrays(
    tok: Any,
    task: str,
    records: list[dict[str, Any]],
    root: Path,
    image_size: int,
    desc: str,
    mel_levels: int,
) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    n = len(records)
    prompts, answers, refs, groups, kinds = [], [], [], [], []
    image_of: dict[str, int] = {}
    images: list[np.ndarray] = []
    image_index = np.full(n, -1, np.int32)
    mels: list[np.ndarray] = []
    lo = np.zeros(n, np.float32)
    hi = np.zeros(n, np.float32)
    for i, rec in enumerate(tqdm(records, desc=desc, unit="rec", leave=False)):
        prompt, answer, group = record_text(task, rec)
        prompts.append(tok.encode(prompt).ids if prompt else [])
        answers.append(tok.encode(answer).ids)
        refs.append(answer)
        groups.append(group)
        kinds.append(str(rec.get("task", task)))
        if rec.get("image"):
            if rec["image"] not in image_of:  # image questions share pictures: store each once
                image_of[rec["image"]] = len(images)
                images.append(resize_image(load_rgb(media_path(root, task, rec["image"])), image_size))
            image_index[i] = image_of[rec["image"]]
        if rec.get("audio"):
            m = log_mel(load_wave(media_path(root, task, rec["audio"])))
            lo[i], hi[i] = float(m.min()), float(m.max())
            scale = max(hi[i] - lo[i], 1e-6)
            mels.append(np.round((m - lo[i]) / scale * (mel_levels - 1)).astype(np.uint8))
        else:
            mels.append(np.zeros((N_MELS, 0), np.uint8))
    pf, po = _ragged(prompts)
    af, ao = _ragged(answers)
    moff = np.zeros(n + 1, np.int64)
    moff[1:] = np.cumsum([m.shape[1] for m in mels])
    return {
        "prompt_tokens": pf,
        "prompt_offsets": po,
        "answer_tokens": af,
        "answer_offsets": ao,
        "references": np.array(refs),
        "groups": np.array(groups),
        "kinds": np.array(kinds),
        "image_index": image_index,
        "images": np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8),
        "mel_q": np.concatenate(mels, axis=1),
        "mel_offsets": moff,
        "mel_lo": lo,
        "mel_hi": hi,
        "mel_levels": np.array(mel_levels),
    }


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """npz inside xz: LZMA packs the sparse log-mel and flat-coloured scenes much better than zip."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(lzma.compress(buf.getvalue(), preset=6))


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(lzma.decompress(path.read_bytes()))) as z:
        return {k: z[k] for k in z.files}


def write_pack(
    dataset_root: str | Path,
    out: str | Path,
    tokenizer: Any,
    *,
    image_size: int,
    splits: Sequence[str] = ("train", "val", "test"),
    tasks: Sequence[str] = ("text", "image", "speech", "mixed"),
    max_text_len: int = 256,
    mel_levels: int = 16,
    limits: dict[str, int] | None = None,
    speech_texts: bool = True,
) -> Path:
    """Tokenize and featurize a dataset into a pack directory (atomic); returns its path.

    `speech_texts`: write the speech text lists and leave out the training audio of SYNTHESISED tasks.
    """
    root = Path(dataset_root)
    manifest = root / "manifest.json"
    meta: dict[str, Any] = {
        "schema": PACK_SCHEMA,
        "image_size": image_size,
        "max_text_len": max_text_len,
        "mel_levels": mel_levels,
        "dataset_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
        if manifest.is_file()
        else None,
        "counts": {},
    }
    with atomic_dir(out, TRAINING_PACK) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        if speech_texts:
            meta["speech_texts"] = _write_speech_texts(root, tmp)
        for task in tasks:
            for split in splits:
                if not (root / task / f"{split}.jsonl").is_file():
                    continue
                if speech_texts and split == "train" and task in SYNTHESISED:
                    continue
                recs = read_records(root, task, split)[: (limits or {}).get(f"{task}/{split}")]
                if not recs:
                    continue
                if task == "text":
                    arrays = _text_arrays(tokenizer, recs, max_text_len)
                    n = len(arrays["offsets"]) - 1
                else:
                    desc = f"{task}/{split}"
                    arrays = _media_arrays(tokenizer, task, recs, root, image_size, desc, mel_levels)
                    n = len(recs)
                _save(tmp / f"{task}_{split}.npz.xz", arrays)
                meta["counts"][f"{task}/{split}"] = n
        meta["tokenizer_sha256"] = hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
        atomic_write_json(tmp / "pack.json", meta)
    return Path(out)


def _write_speech_texts(root: Path, out: Path) -> dict[str, int]:
    """The training speech texts of a dataset and the held-out texts they exclude, as pack files."""
    from omniedge.data.speech_corpus import held_out_texts, training_texts, write_lines
    from omniedge.training.synth import HELD_OUT, SENTENCES, WORDS

    def rows(task: str, split: str) -> list[dict[str, Any]]:
        return read_records(root, task, split) if (root / task / f"{split}.jsonl").is_file() else []

    docs = {s: [r["text"] for r in rows("text", s)] for s in ("train", "val", "test")}
    spoken = [r.get("text", "") for s in ("val", "test") for r in rows("speech", s)]
    held = held_out_texts(docs["val"] + docs["test"], spoken)
    sentences, words = training_texts(docs["train"], held)
    if not sentences:
        raise OmniedgeError(
            f"{root} has no training sentences to speak", "build the dataset with its text task"
        )
    write_lines(out / SENTENCES, sentences)
    write_lines(out / WORDS, words)
    write_lines(out / HELD_OUT, sorted(held))
    return {"sentences": len(sentences), "words": len(words), "held_out": len(held)}


def read_pack_meta(pack: str | Path) -> dict[str, Any]:
    f = Path(pack) / "pack.json"
    if not f.is_file():
        raise OmniedgeError(
            f"{pack} is not a training pack (no pack.json)",
            "make one: python -m omniedge.training.train pack DATASET_DIR PACK_DIR",
        )
    return json.loads(f.read_text())


def load_pack_examples(
    pack: str | Path, task: str, split: str, dither_seed: int | None = None
) -> list[Example]:
    """Examples of one task split from a pack (features dequantized, images patchified).

    With `dither_seed`, log-mel gets uniform noise of one quantization step, so training sees continuous
    values as the runtime's exact features are.
    """
    f = Path(pack) / f"{task}_{split}.npz.xz"
    if not f.is_file():
        return []
    z = _load(f)
    if task == "text":
        toks = _unragged(z["tokens"].astype(np.int64), z["offsets"])
        return [Example("text", t, group=str(g)) for t, g in zip(toks, z["groups"], strict=True)]
    prompts = _unragged(z["prompt_tokens"], z["prompt_offsets"])
    answers = _unragged(z["answer_tokens"], z["answer_offsets"])
    patches = [patchify(img) for img in z["images"]]
    mel_q, moff, lo, hi = z["mel_q"], z["mel_offsets"], z["mel_lo"], z["mel_hi"]
    top = float(z["mel_levels"]) - 1
    rng = np.random.default_rng(dither_seed) if dither_seed is not None else None
    out = []
    for i in range(len(answers)):
        pv = grid = mel = None
        if z["image_index"][i] >= 0:
            pv, grid = patches[int(z["image_index"][i])]
        if moff[i + 1] > moff[i]:
            q = mel_q[:, moff[i] : moff[i + 1]].astype(np.float32)
            if rng is not None:
                q += rng.uniform(-0.5, 0.5, q.shape).astype(np.float32)
            mel = q / top * (hi[i] - lo[i]) + lo[i]
        out.append(
            Example(
                task,
                answer=answers[i],
                prompt=prompts[i],
                pixel_values=pv,
                image_grid=grid,
                mel=mel,
                reference=str(z["references"][i]),
                group=str(z["groups"][i]),
                kind=str(z["kinds"][i]),
            )
        )
    return out
