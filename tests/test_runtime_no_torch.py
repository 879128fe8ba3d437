"""The on-device runtime must not need torch or transformers: a Jetson app installs numpy + onnxruntime only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import omniedge

RUNTIME = Path(omniedge.__file__).parent / "runtime"
FORBIDDEN = {"torch", "transformers", "torchvision", "torchaudio", "accelerate", "safetensors.torch"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "__import__",
            "import_module",
        ):
            names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def test_no_forbidden_import_in_runtime_sources() -> None:
    files = sorted(RUNTIME.rglob("*.py"))
    assert len(files) >= 9, files
    bad = [
        f"{f.name}: {n}"
        for f in files
        for n in _imports(f)
        if n.split(".")[0] in FORBIDDEN or n in FORBIDDEN or n.startswith("omniedge.compress")
    ]
    assert not bad, bad


_BLOCKED = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision", "torchaudio"):
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
import omniedge.runtime.app, omniedge.runtime.cli_run, omniedge.runtime.backends
from omniedge.runtime import Omni, load_manifest
from omniedge.runtime.preprocess import log_mel, audio_chunks, image_inputs
from omniedge.runtime.media import resample
mel = log_mel(resample(np.random.default_rng(0).standard_normal(22050).astype(np.float32), 22050, 16000))
chunks = audio_chunks(mel)
pv, grid = image_inputs(np.zeros((70, 70, 3), np.uint8), (64, 64))
assert chunks.num_tokens == 13 and grid == (1, 4, 4)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not leaked, leaked
print("ok")
"""


def test_runtime_imports_and_runs_with_torch_blocked() -> None:
    r = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
