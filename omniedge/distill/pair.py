"""Teacher and student: loading them, what identifies them, and whether one can be distilled into the other.

Both read the same batch (token ids, pixel patches, log-mel), so they must agree on the vocabulary
(same tokens for the same ids: KL compares distributions over it) and on how each input modality the
data uses reaches the model: image patch geometry, log-mel bins and windows, the placeholder token ids,
the image size. Anything else (layers, experts, widths) may differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniedge.checkpoint import META_FILE, file_sha256, read_meta
from omniedge.errors import OmniedgeError

_SMALL = 64 << 20  # files below this are content-hashed for identities; larger ones recorded by size


@dataclass
class Loaded:
    """A loaded checkpoint: full model (float weights), tokenizer, and what identifies it."""

    name: str
    path: Path
    model: Any  # None when only the config was read
    tokenizer: Any
    meta: dict[str, Any]
    config: dict[str, Any]  # config.json as written
    hf_config: Any  # transformers' Qwen3OmniMoeConfig

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.config.get("omniedge_quantization")

    @property
    def image_size(self) -> int:
        return int(self.meta.get("preprocess", {}).get("image_size", 64))

    @property
    def dtype(self) -> str:
        return str(self.config.get("dtype") or self.config.get("torch_dtype") or "float32")


def checkpoint_identity(path: Path) -> dict[str, str]:
    """Content hashes of a checkpoint's files (from its omniedge.json when it records them; files above
    64 MiB by size, as hashing a 70 GB teacher would take longer than distilling)."""
    files = read_meta(path).get("files")
    if isinstance(files, dict) and files:
        return dict(sorted(files.items()))
    out = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != META_FILE:
            size = f.stat().st_size
            out[f.name] = file_sha256(f) if size < _SMALL else f"bytes:{size}"
    return out


def load(name: str | Path, dtype: Any = None) -> Loaded:
    """A checkpoint directory or built-in name (`tiny`, `omni-mini`) with float weights, eval mode.
    An INT4 checkpoint comes dequantized (trainable floats)."""
    from omniedge.checkpoint import load_checkpoint
    from omniedge.models.registry import resolve_checkpoint

    path = resolve_checkpoint(str(name))
    model, tok = load_checkpoint(path, dtype, dequantize=True)
    config = json.loads((path / "config.json").read_text())
    return Loaded(str(name), path, model, tok, read_meta(path), config, model.config)


def load_config_only(path: Path) -> Loaded:
    """What the checks need of a teacher without loading its weights (a 70 GB teacher stays on disk)."""
    from tokenizers import Tokenizer
    from transformers import Qwen3OmniMoeConfig

    from omniedge.checkpoint import check_checkpoint_dir

    path = check_checkpoint_dir(path)
    config = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return Loaded(
        path.name, path, None, tok, read_meta(path), config, Qwen3OmniMoeConfig.from_pretrained(path)
    )


def input_contract(config: Any, image_size: int) -> dict[str, dict[str, Any]]:
    """Per modality, every setting that decides how a batch reaches the model (transformers config)."""
    th = config.thinker_config
    v, a = th.vision_config, th.audio_config
    return {
        "text": {"vocab_size": th.text_config.vocab_size},
        "image": {
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "in_channels": getattr(v, "in_channels", 3),
            "image_token_id": th.image_token_id,
            "vision_start_token_id": th.vision_start_token_id,
            "vision_end_token_id": th.vision_end_token_id,
            "image_size": image_size,
        },
        "audio": {
            "num_mel_bins": a.num_mel_bins,
            "n_window": a.n_window,
            "audio_token_id": th.audio_token_id,
            "audio_start_token_id": th.audio_start_token_id,
            "audio_end_token_id": getattr(th, "audio_end_token_id", None),
        },
    }


def check_pair(teacher: Loaded, student: Loaded, modalities: set[str]) -> None:
    """One clear error when the student cannot learn from the teacher on data of these modalities."""
    tv, sv = teacher.tokenizer.get_vocab_size(), student.tokenizer.get_vocab_size()
    t_cfg = teacher.hf_config.thinker_config.text_config.vocab_size
    s_cfg = student.hf_config.thinker_config.text_config.vocab_size
    if (tv, t_cfg) != (sv, s_cfg):
        raise OmniedgeError(
            f"teacher and student have different vocabularies: teacher {teacher.path} {t_cfg} logits "
            f"({tv} tokens), student {student.path} {s_cfg} logits ({sv} tokens); the KL compares "
            "distributions over one vocabulary",
            "distil into a student made from this teacher (omniedge compress TEACHER -o STUDENT) or one "
            "trained with the teacher's tokenizer.json",
        )
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise OmniedgeError(
            f"teacher and student have vocabularies of the same size ({tv}) but different tokens",
            "use a student with the teacher's tokenizer.json",
        )
    tc = input_contract(teacher.hf_config, teacher.image_size)
    sc = input_contract(student.hf_config, student.image_size)
    for modality in sorted(modalities - {"text"}):
        diff = {
            k: (tc[modality][k], sc[modality][k]) for k in tc[modality] if tc[modality][k] != sc[modality][k]
        }
        if diff:
            what = ", ".join(f"{k} {t} (teacher) vs {s} (student)" for k, (t, s) in diff.items())
            raise OmniedgeError(
                f"teacher and student read {modality} inputs differently ({what}); the data has {modality} "
                "examples, and both models must take the same batch",
                f"use a student with the teacher's {modality} encoder settings, or distil on data without "
                f"{modality} (--batch with 0 for those tasks)",
            )
