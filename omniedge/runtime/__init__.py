"""The on-device runtime: bundle in, answers out. numpy, tokenizers, pillow, onnxruntime only (no torch).

Entry point for robot and kiosk code: `from omniedge.runtime import Omni`. Attributes load lazily so
that importing one helper (say `omniedge.runtime.preprocess`) does not import onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Omni", "Result", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name in ("Omni", "Result"):
        from omniedge.runtime import app

        return getattr(app, name)
    if name == "load_manifest":
        from omniedge.runtime.manifest import load_manifest

        return load_manifest
    raise AttributeError(f"module 'omniedge.runtime' has no attribute {name!r}")
