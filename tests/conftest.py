"""Shared fixtures: the tiny model compressed with the default recipe and exported once, cached under
OMNIEDGE_HOME by everything that shapes them (sources and toolchain versions)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The tiny model after the default recipe (prune half the experts + INT4), cached per compressor version."""
    pytest.importorskip("torch")
    import hashlib

    import omniedge.compress
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import default_recipe
    from omniedge.models.registry import resolve_checkpoint
    from omniedge.paths import home, toolchain_versions

    src = resolve_checkpoint("tiny")
    h = hashlib.sha256(src.name.encode() + repr(sorted(toolchain_versions().items())).encode())
    for f in sorted(Path(omniedge.compress.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    out = home() / "test-checkpoints" / f"tiny-int4-{h.hexdigest()[:12]}"
    if not (out / "omniedge.json").is_file():
        compress(src, out, default_recipe(), progress=False)
    return out


def _export_key(checkpoint: Path) -> str:
    """Exporter sources + checkpoint identity + toolchain versions: a cached bundle is reused only if none changed."""
    import hashlib

    import omniedge.export
    from omniedge.paths import toolchain_versions

    h = hashlib.sha256(repr(sorted(toolchain_versions().items())).encode())
    for f in sorted(Path(omniedge.export.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    h.update((checkpoint / "omniedge.json").read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def bundle(checkpoint: Path) -> Path:
    """The tiny checkpoint exported once per exporter version (about a minute), cached under OMNIEDGE_HOME."""
    exporter = pytest.importorskip("omniedge.export.bundle", reason="export/bundle.py is not there yet")
    from omniedge.paths import home

    out = home() / "test-bundles" / f"tiny-{_export_key(checkpoint)}"
    if not (out / "manifest.json").is_file():
        exporter.export_bundle(checkpoint, out)  # atomic: a crash leaves no half bundle
    return out
