"""The files a bundle's manifest names: all there (checked at every load), their recorded hashes (checked
on request: `omniedge info`, `load_manifest(verify_checksums=True)`), and the two that are not engines, the
tokenizer and the embedding table, read the one way `run` and `info` both use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.hashing import file_sha256

if TYPE_CHECKING:
    from omniedge.runtime.manifest import Manifest

REEXPORT = "re-export the bundle with `omniedge export CHECKPOINT -o BUNDLE`"


def check_files(m: Manifest) -> None:
    missing = [p for p in (m.tokenizer_file, m.embed_file) if not p.is_file()]
    for c in m.components.values():
        paths = [p for p in (c.onnx, c.engine) if p is not None]
        if not any(p.is_file() for p in paths):
            missing.extend(paths)
        missing.extend(m.root / name for name in c.sha256 if not (m.root / name).is_file())
    if missing:
        names = ", ".join(sorted({str(p.relative_to(m.root)) for p in missing}))
        raise OmniedgeError(
            f"bundle {m.root} is incomplete: missing {names}",
            "copy the whole bundle directory (external .data files too) or " + REEXPORT,
        )


def verify(m: Manifest) -> None:
    """Compare every file hash the manifest records; a partial copy or bit rot fails here."""
    for c in m.components.values():
        for name, expected in c.sha256.items():
            got = file_sha256(m.root / name)
            if got != expected:
                raise OmniedgeError(
                    f"bundle {m.root}: {name} is damaged (sha256 {got[:12]}..., manifest says {expected[:12]}...)",
                    "copy the file again from the machine that exported it, or " + REEXPORT,
                )


def load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise OmniedgeError(f"cannot read tokenizer {path}: {e}", "re-export the bundle") from e


def load_embed(m: Manifest) -> np.ndarray:
    try:
        table = np.load(m.embed_file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise OmniedgeError(f"cannot read {m.embed_file}: {e}", "re-export the bundle") from e
    if table.shape != m.embed_shape:
        raise OmniedgeError(
            f"{m.embed_file.name} has shape {table.shape}, the manifest says {m.embed_shape}",
            "re-export the bundle",
        )
    # a plain array over the same mapped pages: a row of a np.memmap costs microseconds of subclass
    # bookkeeping on every decode step
    return table.view(np.ndarray)
