"""Shared fixtures: the default model's bundle (omni-mini), built once and cached like `omniedge run` does."""

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
