"""The compressed-checkpoint contract: an HF model directory plus omniedge.json (recipe, measurements, hashes).

Imports torch/transformers lazily: the runtime may import this module's light helpers on a Jetson.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.errors import OmniedgeError
from omniedge.hashing import file_sha256
from omniedge.outputs import CHECKPOINT

META_FILE = "omniedge.json"
WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail with a clear message unless `path` looks like a Qwen3-Omni HF checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise OmniedgeError(
            f"checkpoint not found: {p}",
            "pass a directory written by `omniedge compress` or `save_pretrained`, or the name `tiny`",
        )
    if not p.is_dir():
        raise OmniedgeError(
            f"{p} is a file, not a checkpoint directory", "pass the directory that holds config.json"
        )
    cfg = p / "config.json"
    if not cfg.is_file():
        raise OmniedgeError(
            f"{p} is not a checkpoint: it has no config.json",
            "pass the directory written by `omniedge compress` or `save_pretrained`",
        )
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniedgeError(f"{cfg} is not valid JSON ({e})", "re-create the checkpoint") from e
    if not isinstance(config, dict):
        raise OmniedgeError(
            f"{cfg} holds a JSON {type(config).__name__}, not a model config object",
            "re-create the checkpoint",
        )
    model_type = config.get("model_type")
    if model_type != "qwen3_omni_moe":
        raise OmniedgeError(
            f"{p} holds a {model_type!r} model, not Qwen3-Omni (model_type 'qwen3_omni_moe')",
            "pass a Qwen3-Omni checkpoint",
        )
    if not any(any(p.glob(g)) for g in WEIGHT_GLOBS):
        raise OmniedgeError(f"{p} has a config but no weight files (*.safetensors)", "copy the weights too")
    if not (p / "tokenizer.json").is_file():
        raise OmniedgeError(f"{p} has no tokenizer.json", "copy tokenizer.json beside config.json")
    read_meta(p)  # a damaged omniedge.json fails here, before any weights load
    return p


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's omniedge.json ({} when it has none); a damaged one is a clear error."""
    f = Path(path) / META_FILE
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniedgeError(
            f"{f} is damaged: not valid JSON ({e})",
            f"re-create the checkpoint, or delete {f} if the weights beside it are all you need",
        ) from e
    if not isinstance(meta, dict):
        raise OmniedgeError(
            f"{f} is damaged: a JSON {type(meta).__name__}, not an object",
            f"re-create the checkpoint, or delete {f} if the weights beside it are all you need",
        )
    return meta


def content_hashes(directory: str | Path) -> dict[str, str]:
    d = Path(directory)
    return {f.name: file_sha256(f) for f in sorted(d.iterdir()) if f.is_file() and f.name != META_FILE}


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    meta: dict[str, Any],
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """save_pretrained + tokenizer + omniedge.json, into a temp dir renamed into place at the end.

    `extra_files` maps file names to callables that write them given the temp directory path.
    """
    from omniedge.models.tokenizer import save_tokenizer

    path = Path(path)
    with atomic_dir(path, CHECKPOINT) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        for _name, writer in (extra_files or {}).items():
            writer(tmp)
        meta = {"schema": 1, **meta, "files": content_hashes(tmp)}
        atomic_write_json(tmp / META_FILE, meta)
    return path


def load_checkpoint(path: str | Path, dtype: Any = None, dequantize: bool = False) -> tuple[Any, Any]:
    """(model, tokenizers.Tokenizer) from a checkpoint directory, eval mode.

    An omniedge INT4 checkpoint (config.json has `omniedge_quantization`) loads with its quantized weights
    kept packed and dequantized on the fly (omniedge.int4_modules); `dequantize=True` gives ordinary float
    weights instead. So does a checkpoint pruned to a different expert count per layer (text config
    `omniedge_experts_per_layer`), which from_pretrained cannot build. Any other checkpoint loads through
    transformers' from_pretrained.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3OmniMoeForConditionalGeneration

    p = check_checkpoint_dir(path)
    dtype = dtype or torch.float32
    try:
        from omniedge.int4_modules import experts_per_layer, load_quantized

        config = json.loads((p / "config.json").read_text())
        text_config = config.get("thinker_config", {}).get("text_config", {})
        if "omniedge_quantization" in config or experts_per_layer(text_config) is not None:
            model = load_quantized(p, dtype, dequantize=dequantize)
        else:
            model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(p, dtype=dtype)
    except OmniedgeError:
        raise
    except Exception as e:  # transformers raises many types for a damaged directory
        raise OmniedgeError(
            f"transformers could not load {p}: {e}", "re-create or re-download the checkpoint"
        ) from e
    return model.eval(), Tokenizer.from_file(str(p / "tokenizer.json"))
