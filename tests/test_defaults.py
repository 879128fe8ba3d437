"""The cached default bundle: built once with one announcement (the child process that builds it does not
repeat the parent's line), and rebuilt, not blamed on the user, when the cache is damaged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BUILD = "from omniedge.defaults import default_bundle; print('BUNDLE', default_bundle({model!r}, subprocess=True))"


def _python(code: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMNIEDGE_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_default_bundle_announced_once_and_a_damaged_cache_rebuilt(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = _python(BUILD.format(model="tiny"), home)  # the tiny model stands in for omni-mini: seconds
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("building the default model's bundle") == 1, r.stdout
    bundle = Path(r.stdout.split("BUNDLE ")[-1].strip())
    assert (bundle / ".complete").is_file()

    again = _python(BUILD.format(model="tiny"), home)
    assert again.returncode == 0 and "building" not in again.stdout  # cached: nothing rebuilt

    (bundle / "thinker.onnx").unlink()  # a damaged cache (a disk clean-up, a cut copy)
    fixed = _python(BUILD.format(model="tiny"), home)
    assert fixed.returncode == 0, fixed.stderr
    assert "the cached default bundle is damaged" in fixed.stdout and "rebuilding it" in fixed.stdout
    assert "re-export" not in fixed.stdout + fixed.stderr
    from omniedge.runtime.manifest import load_manifest

    load_manifest(bundle, verify_checksums=True)  # whole again
