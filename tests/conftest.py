"""Shared fixtures, built once and cached under OMNIEDGE_HOME by everything that shapes them (sources and
toolchain versions): the default model's bundle (omni-mini), and the tiny model compressed with the default
recipe and exported in both thinker flavours."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def omni_mini_bundle() -> Path:
    """The cached default bundle (compress + export of omni-mini on first use, about 20 s)."""
    from omniedge.defaults import default_bundle

    return default_bundle(progress=False)


@pytest.fixture
def fresh_bundle(omni_mini_bundle: Path, tmp_path: Path) -> Path:
    """A private copy with no recorded memory footprints (memory.json), so a test sees a first start."""
    dst = tmp_path / "bundle"
    shutil.copytree(omni_mini_bundle, dst, ignore=shutil.ignore_patterns("memory.json"))
    return dst


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


def _tiny_bundle(checkpoint: Path, flavour: str) -> Path:
    exporter = pytest.importorskip("omniedge.export.bundle", reason="export/bundle.py is not there yet")
    from omniedge.paths import home

    out = home() / "test-bundles" / f"tiny-{flavour}-{_export_key(checkpoint)}"
    if not (out / "manifest.json").is_file():
        exporter.export_bundle(checkpoint, out, flavour=flavour, progress=False)  # atomic: no half bundle
    return out


@pytest.fixture(scope="session")
def bundle(checkpoint: Path) -> Path:
    """The tiny checkpoint exported once per exporter version (thinker of ONNX Runtime contrib ops, the default)."""
    return _tiny_bundle(checkpoint, "ort")


@pytest.fixture(scope="session")
def portable_bundle(checkpoint: Path) -> Path:
    """The same with the portable thinker (standard ONNX ops, for TensorRT)."""
    return _tiny_bundle(checkpoint, "portable")
