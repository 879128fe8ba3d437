"""Where omniedge keeps what it builds: $OMNIEDGE_HOME, else ~/.cache/omniedge."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    p = Path(os.environ.get("OMNIEDGE_HOME") or Path.home() / ".cache" / "omniedge")
    p.mkdir(parents=True, exist_ok=True)
    return p


TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def toolchain_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape what compress and export build (without importing
    them): every cache of built checkpoints or bundles is keyed by these, so an upgrade never reuses a stale one."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in TOOLCHAIN:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
