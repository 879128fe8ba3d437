"""The built-in default model, compressed and exported once and cached, for `omniedge run` and `bench`.

Needs the offline extras (torch, transformers, onnx) the first time; afterwards only the cached bundle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omniedge import __version__
from omniedge.errors import OmniedgeError
from omniedge.paths import home

DEFAULT_MODEL = "tiny"


def _code_hash() -> str:
    """Hash of the stages' source, so a changed exporter or compressor never reuses a stale bundle."""
    import omniedge
    import omniedge.export

    h = hashlib.sha256()
    roots = [Path(omniedge.__file__).parent / d for d in ("compress", "models")]
    roots.append(Path(omniedge.export.__file__).parent)
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()


def _key(model: str, recipe: dict) -> str:
    blob = json.dumps(
        {"omniedge": __version__, "model": model, "recipe": recipe, "code": _code_hash()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_bundle(model: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Bundle directory of the default model: reused when cached, else compress -> export (minutes at most)."""
    from omniedge.compress.recipe import default_recipe  # light: yaml/json only

    recipe = default_recipe()
    key = _key(model, recipe)
    ckpt = home() / "checkpoints" / f"{model}-{key}"
    bundle = home() / "bundles" / f"{model}-{key}"
    if (bundle / ".complete").is_file():
        return bundle
    try:
        from omniedge.compress.pipeline import compress
        from omniedge.export.bundle import export_bundle
    except ImportError as e:
        raise OmniedgeError(
            f"building the default model's bundle needs the offline extras ({e.name} is missing)",
            'pip install "omniedge[offline,ort]", or pass a bundle directory you exported elsewhere',
        ) from e
    if progress:
        print(f"building the default model's bundle ({model}) once, into {bundle}")
    if not (ckpt / "omniedge.json").is_file():
        compress(model, ckpt, recipe, progress=progress)
    export_bundle(ckpt, bundle)
    (bundle / ".complete").write_text(key + "\n")
    return bundle
