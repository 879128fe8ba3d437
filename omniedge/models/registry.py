"""Names a user can type instead of a path (`tiny`), resolved to checkpoints built and cached on first use."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omniedge.paths import home, toolchain_versions

BUILT_IN = ("tiny", "omni-mini")


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
    from omniedge.checkpoint import check_checkpoint_dir

    return check_checkpoint_dir(s)
