"""Dataset records -> Qwen3-Omni chat-format examples (labels only on the answer) -> model input batches.

One code path for training, evaluation and the GPU pack, and it is the runtime's own preprocessing
(omniedge.runtime.preprocess, numpy): audio as Whisper log-mel (128 bins, 16 kHz, hop 160) and images
as the Qwen2-VL patchify of the picture resized to a fixed square, so the model sees at training time
exactly what the runtime feeds it on the device.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.prompts import ASR_PROMPT

IGNORE_INDEX = -100
SAMPLING_RATE = 16000
HOP_LENGTH = 160
N_MELS = 128
PATCH, TEMPORAL, MERGE = 16, 2, 2
MEAN = STD = 0.5


# ---------------------------------------------------------------- chat format


@dataclass(frozen=True)
class ChatTokens:
    """Token ids of Qwen3-Omni's chat scaffolding in one tokenizer."""

    im_start: int
    im_end: int
    pad: int
    vision_start: int
    vision_end: int
    image_pad: int
    audio_start: int
    audio_end: int
    audio_pad: int
    user: int
    assistant: int
    newline: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok: Any) -> ChatTokens:
        from omniedge.models.tokenizer import special_ids

        s = special_ids(tok)
        return cls(
            im_start=s["im_start"],
            im_end=s["im_end"],
            pad=s["endoftext"],
            vision_start=s["vision_start"],
            vision_end=s["vision_end"],
            image_pad=s["image_pad"],
            audio_start=s["audio_start"],
            audio_end=s["audio_end"],
            audio_pad=s["audio_pad"],
            user=s["user"],
            assistant=s["assistant"],
            newline=tuple(tok.encode("\n").ids),
        )


@dataclass
class Example:
    """One training/eval sample. Text-task samples put the whole chunk in `answer` (all tokens labelled)."""

    task: str
    answer: list[int]
    prompt: list[int] = field(default_factory=list)
    pixel_values: np.ndarray | None = None  # float32 [patches, 3*2*16*16]
    image_grid: tuple[int, int, int] | None = None
    mel: np.ndarray | None = None  # float32 [n_mels, frames]
    reference: str = ""  # the answer as text (accuracy, WER)
    group: str = ""  # bootstrap unit: document id, image, voice ...
    kind: str = ""  # question type (count, colour, photo, ...) for per-kind scores
    spoken: list[int] | None = None  # token ids of what the audio says (the CTC target), when known


def audio_token_count(frames: int, n_window: int = 50) -> int:
    """Audio tokens the encoder makes from `frames` log-mel frames (transformers' formula)."""
    chunk = 2 * n_window
    leave = frames % chunk
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13


def user_turn(ct: ChatTokens, ex: Example) -> list[int]:
    """`<|im_start|>user\\n[image][audio]prompt<|im_end|>\\n<|im_start|>assistant\\n`: the generation prompt."""
    ids = [ct.im_start, ct.user, *ct.newline]
    if ex.image_grid is not None:
        t, h, w = ex.image_grid
        ids += [ct.vision_start, *[ct.image_pad] * (t * h * w // MERGE**2), ct.vision_end]
    if ex.mel is not None:
        ids += [ct.audio_start, *[ct.audio_pad] * audio_token_count(ex.mel.shape[1]), ct.audio_end]
    return [*ids, *ex.prompt, ct.im_end, *ct.newline, ct.im_start, ct.assistant, *ct.newline]


def sequence(ct: ChatTokens, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels) for teacher forcing; labels are IGNORE_INDEX except on the answer and <|im_end|>."""
    if ex.task == "text":
        return list(ex.answer), list(ex.answer)
    head = user_turn(ct, ex)
    tail = [*ex.answer, ct.im_end]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


def mrope_positions(ct: ChatTokens, ids: Sequence[int], grids: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """[3, len(ids)] M-RoPE (t, h, w) positions of one unpadded sequence, as transformers' get_rope_index.

    Text and audio advance all three together; an image's tokens sit on its merged grid (t, row, col)
    offset by the position where the image starts; whatever follows starts after the largest of them.
    Computed here, in the batch-making workers, so training does not run that per-row loop on the GPU.
    """
    n = len(ids)
    out = np.zeros((3, n), np.int64)
    arr = np.asarray(ids)
    starts = np.flatnonzero(arr == ct.vision_start).tolist()
    i, nxt, img = 0, 0, 0
    for vs in starts:
        out[:, i : vs + 1] = np.arange(nxt, nxt + vs + 1 - i)  # text up to and including <|vision_start|>
        nxt += vs + 1 - i
        t, h, w = grids[img]
        gh, gw = h // MERGE, w // MERGE
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        k = t * gh * gw
        out[:, vs + 1 : vs + 1 + k] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + nxt
        nxt = int(out[:, vs + 1 : vs + 1 + k].max()) + 1
        i, img = vs + 1 + k, img + 1
    out[:, i:] = np.arange(nxt, nxt + n - i)
    return out


def collate(
    ct: ChatTokens,
    examples: Sequence[Example],
    *,
    generation: bool = False,
    positions: bool = False,
    ctc: bool = False,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Model kwargs for a batch: right-padded with labels for training, left-padded prompts for generation.

    `positions=True` (training only) adds precomputed M-RoPE `position_ids` [3, batch, width].
    `ctc=True` adds what the audio of each example with audio says, for the CTC loss (not model kwargs):
    `ctc_targets` (token ids, concatenated) and `ctc_target_lengths` (0 where `spoken` is unknown).
    """
    import torch

    if generation:
        seqs = [(user_turn(ct, ex) if ex.task != "text" else list(ex.answer), None) for ex in examples]
    else:
        seqs = [sequence(ct, ex) for ex in examples]
    width = max(len(s) for s, _ in seqs)
    ids = np.full((len(seqs), width), ct.pad, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, np.int64)
    for i, (s, lab) in enumerate(seqs):
        sl = slice(width - len(s), width) if generation else slice(0, len(s))
        ids[i, sl] = s
        mask[i, sl] = 1
        if lab is not None:
            labels[i, sl] = lab
    out: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if not generation:
        out["labels"] = torch.from_numpy(labels)
    if positions and not generation:
        pos = np.ones((3, len(seqs), width), np.int64)
        for i, ((s, _), ex) in enumerate(zip(seqs, examples, strict=True)):
            pos[:, i, : len(s)] = mrope_positions(ct, s, [ex.image_grid] if ex.image_grid else [])
        out["position_ids"] = torch.from_numpy(pos)
    imgs = [ex for ex in examples if ex.pixel_values is not None]
    if imgs:
        out["pixel_values"] = torch.from_numpy(np.concatenate([ex.pixel_values for ex in imgs]))
        out["image_grid_thw"] = torch.tensor([ex.image_grid for ex in imgs], dtype=torch.long)
    auds = [ex.mel for ex in examples if ex.mel is not None]
    if auds:
        frames = max(m.shape[1] for m in auds)
        feats = np.zeros((len(auds), auds[0].shape[0], frames), np.float32)
        fmask = np.zeros((len(auds), frames), np.int64)
        for i, m in enumerate(auds):
            feats[i, :, : m.shape[1]] = m
            fmask[i, : m.shape[1]] = 1
        out["input_features"] = torch.from_numpy(feats)
        out["feature_attention_mask"] = torch.from_numpy(fmask)
        if ctc:
            said = [ex.spoken or [] for ex in examples if ex.mel is not None]
            out["ctc_targets"] = torch.tensor([t for s in said for t in s], dtype=torch.long)
            out["ctc_target_lengths"] = torch.tensor([len(s) for s in said], dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()}


# ---------------------------------------------------------------- preprocessing (runtime-identical)


def patchify(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Qwen2-VL patchify of an HxWx3 uint8 image (H, W multiples of 32): ([patches, 1536], grid_thw)."""
    from omniedge.runtime.preprocess import patchify as runtime_patchify

    h, w = rgb.shape[:2]
    if h % (PATCH * MERGE) or w % (PATCH * MERGE):
        raise OmniedgeError(f"image {w}x{h} is not a multiple of {PATCH * MERGE}", "resize it first")
    return runtime_patchify(rgb, PATCH, TEMPORAL, MERGE, (MEAN,) * 3, (STD,) * 3)


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to size x size (the runtime's resize: Pillow, as transformers' processors)."""
    from omniedge.runtime.preprocess import resize_image as runtime_resize

    return runtime_resize(rgb, (size, size))


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper log-mel [128, len // 160] of 16 kHz mono float32 audio (no padding to 30 s)."""
    from omniedge.runtime.preprocess import log_mel as runtime_log_mel

    return runtime_log_mel(np.asarray(wave, np.float32), N_MELS, 400, HOP_LENGTH, SAMPLING_RATE)


def load_wave(path: str | Path) -> np.ndarray:
    from omniedge.runtime.media import load_audio

    return load_audio(path, sampling_rate=SAMPLING_RATE)


def load_rgb(path: str | Path) -> np.ndarray:
    from omniedge.runtime.media import load_image

    return load_image(path)


# ---------------------------------------------------------------- dataset records -> examples


def read_records(root: str | Path, task: str, split: str) -> list[dict[str, Any]]:
    """Records of one task split (omniedge.data's layout: <root>/<task>/<split>.jsonl)."""
    f = Path(root) / task / f"{split}.jsonl"
    if not f.is_file():
        raise OmniedgeError(
            f"dataset split not found: {f}",
            "build the dataset first: python -c 'from omniedge.data import build_dataset; build_dataset(...)'",
        )
    with f.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def text_examples(tok: Any, records: Sequence[dict[str, Any]], max_len: int) -> list[Example]:
    """Documents cut into chunks of at most `max_len` tokens; the document is the bootstrap group."""
    out = []
    for i, rec in enumerate(records):
        ids = tok.encode(rec["text"]).ids
        gid = str(rec.get("id", i))
        for s in range(0, len(ids), max_len):
            piece = ids[s : s + max_len]
            if len(piece) >= 2:
                out.append(Example("text", piece, group=gid))
    return out


def media_path(root: Path, task: str, rel: str) -> Path:
    """Row paths are relative to the dataset root (omniedge.data); older layouts used the task dir."""
    p = root / rel
    return p if p.exists() else root / task / rel


def record_text(task: str, rec: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt, answer, bootstrap group) of a record."""
    if task == "speech":
        return ASR_PROMPT, rec["text"], str(rec.get("voice", ""))
    return rec.get("prompt", ""), rec["answer"], str(rec.get("image", ""))


def media_example(tok: Any, task: str, rec: dict[str, Any], root: Path, image_size: int) -> Example:
    """An image / speech / mixed record as an Example with runtime-identical features."""
    pv = grid = mel = None
    if rec.get("image"):
        pv, grid = patchify(resize_image(load_rgb(media_path(root, task, rec["image"])), image_size))
    if rec.get("audio"):
        mel = log_mel(load_wave(media_path(root, task, rec["audio"])))
    prompt, answer, group = record_text(task, rec)
    return Example(
        task,
        answer=tok.encode(answer).ids,
        prompt=tok.encode(prompt).ids if prompt else [],
        pixel_values=pv,
        image_grid=grid,
        mel=mel,
        reference=answer,
        group=group,
        kind=str(rec.get("task", task)),
    )


def dataset_examples(
    tok: Any,
    root: str | Path,
    task: str,
    split: str,
    *,
    image_size: int,
    max_text_len: int = 256,
    limit: int | None = None,
    progress: bool = False,
) -> list[Example]:
    """Examples of one task split read from a dataset directory (features computed on the fly)."""
    records = read_records(root, task, split)[:limit]
    if task == "text":
        return text_examples(tok, records, max_text_len)
    it: Iterator[dict[str, Any]] | Sequence[dict[str, Any]] = records
    if progress:
        from tqdm import tqdm

        it = tqdm(records, desc=f"{task}/{split}", unit="rec", leave=False)
    return [media_example(tok, task, r, Path(root), image_size) for r in it]
