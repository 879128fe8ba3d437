"""Where omniedge keeps what it builds: $OMNIEDGE_HOME, else ~/.cache/omniedge."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    p = Path(os.environ.get("OMNIEDGE_HOME") or Path.home() / ".cache" / "omniedge")
    p.mkdir(parents=True, exist_ok=True)
    return p
