"""Names a user can type instead of a path (`tiny`, `omni-mini`, `full`), resolved to checkpoints or sources.

`tiny` is built and cached on first use, `omni-mini` ships in the package; both are checkpoint
directories. `full` (the exact Qwen3-Omni-30B-A3B config) and `full-ci` (the same structure at CI size)
are seeded random tensor sources made on demand (omniedge.random_source): `omniedge compress full ...`
streams a full-size model that no disk has to hold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniedge.paths import home, toolchain_versions

BUILT_IN = ("tiny", "omni-mini")
RANDOM_SEED = 0


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A checkpoint directory for a built-in name (built once, cached) or the path itself."""
    s = str(name_or_path)
    if s == "tiny":
        # Keyed by the builder's source and torch/transformers versions: a change rebuilds, never reuses stale.
        src = (
            b"".join(
                (Path(__file__).parent / f).read_bytes() for f in ("tiny.py", "tokenizer.py", "family.py")
            )
            + repr(sorted(toolchain_versions().items())).encode()
        )
        path = home() / "models" / f"tiny-{hashlib.sha256(src).hexdigest()[:10]}"
        if not (path / "omniedge.json").is_file():
            from omniedge.models.tiny import write_tiny

            write_tiny(path)
        return path
    if s == "omni-mini":  # trained, shipped inside the package
        from omniedge.models.omni_mini import omni_mini_path

        return omni_mini_path()
    from omniedge.models.full import RANDOM_MODELS

    if s in RANDOM_MODELS:
        from omniedge.errors import OmniedgeError

        raise OmniedgeError(
            f"`{s}` is a random tensor source, not a checkpoint directory",
            f"compress it first: omniedge compress {s} -o out/{s}-int4",
        )
    from omniedge.checkpoint import check_checkpoint_dir

    return check_checkpoint_dir(s)


@dataclass
class ModelSource:
    """What compression reads: config.json as a dict, tensors by canonical name, the tokenizer."""

    name: str
    config: dict[str, Any]
    tensors: Any  # omniedge.weights.TensorSource
    tokenizer: Any  # tokenizers.Tokenizer
    path: Path | None  # the checkpoint directory; None for a random source
    description: dict[str, Any]  # for omniedge.json


def open_source(name_or_path: str | Path) -> ModelSource:
    """A checkpoint directory (or `tiny`, `omni-mini`) read lazily, or a random source (`full`, `full-ci`)."""
    from omniedge.models.full import RANDOM_MODELS

    s = str(name_or_path)
    if s in RANDOM_MODELS:
        from omniedge.models.full import CONFIG_FILE, qwen_id_tokenizer, random_config_dict
        from omniedge.random_source import STD, RandomSource

        cfg = random_config_dict(s)
        return ModelSource(
            s,
            cfg,
            RandomSource(cfg, seed=RANDOM_SEED),
            qwen_id_tokenizer(cfg),
            None,
            {
                "random": s,
                "seed": RANDOM_SEED,
                "std": STD,
                "config": CONFIG_FILE.name,
                "note": "random weights made on the device (omniedge.random_source): timing and memory only",
            },
        )
    from tokenizers import Tokenizer

    from omniedge.weights import SafetensorsDir

    path = resolve_checkpoint(s)
    cfg = json.loads((path / "config.json").read_text())
    return ModelSource(
        s if s in BUILT_IN else path.name,
        cfg,
        SafetensorsDir(path),
        Tokenizer.from_file(str(path / "tokenizer.json")),
        path,
        {"path": str(path.resolve())},
    )
