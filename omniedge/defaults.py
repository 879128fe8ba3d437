"""The built-in default model, compressed and exported once and cached, for `omniedge run` and `bench`.

Needs the offline extras (torch, transformers, onnx) the first time; afterwards only the cached bundle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from omniedge import __version__
from omniedge.errors import OmniedgeError
from omniedge.outputs import DEFAULT_BUNDLE_CACHE
from omniedge.paths import home, toolchain_versions

DEFAULT_MODEL = "omni-mini"  # trained, shipped in the package (docs/omni-mini.md)


def _code_hash() -> str:
    """Hash of the stages' source, so a changed exporter or compressor never reuses a stale bundle."""
    import importlib.util

    import omniedge

    h = hashlib.sha256()
    roots = [Path(omniedge.__file__).parent / d for d in ("compress", "models")]
    spec = importlib.util.find_spec("omniedge.export")  # locate without importing (it imports torch)
    if spec and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()


def _weights_hash(model: str) -> str:
    """The shipped checkpoint's omniedge.json lists its files' hashes: new weights, new bundle."""
    from omniedge.models.omni_mini import OMNI_MINI_DIR

    meta = OMNI_MINI_DIR / "omniedge.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest() if model == "omni-mini" and meta.is_file() else ""


def _key(model: str, recipe: dict) -> str:
    blob = json.dumps(
        {
            "omniedge": __version__,
            "model": model,
            "recipe": recipe,
            "code": _code_hash(),
            "weights": _weights_hash(model),
            "toolchain": toolchain_versions(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _cached_bundle_problem(bundle: Path) -> str | None:
    """None if the cached bundle passes the runtime's checks (checksums included), else what is wrong."""
    from omniedge.runtime.manifest import load_manifest

    try:
        load_manifest(bundle, verify_checksums=True)
    except OmniedgeError as e:
        return e.problem
    return None


def default_bundle(
    model: str = DEFAULT_MODEL, progress: bool = True, subprocess: bool = False, announce: bool = True
) -> Path:
    """Bundle directory of the default model: reused when cached, else compress -> export (minutes at most).

    A cached bundle that fails the runtime's checks (damaged, half deleted) is rebuilt, never reported as
    something for the user to re-export. `subprocess=True` builds in a child process, so a benchmark's
    memory figures never include torch; `announce=False` keeps the child from repeating the parent's line.
    """
    # The raw recipe file names the cache; validating it imports torch, needed only to build.
    from omniedge.compress.recipe import DEFAULT_RECIPE, DEFAULT_RECIPE_PATH, read_recipe_file

    raw = read_recipe_file(DEFAULT_RECIPE_PATH) if DEFAULT_RECIPE_PATH.is_file() else DEFAULT_RECIPE
    key = _key(model, raw)
    ckpt = home() / "checkpoints" / f"{model}-{key}"
    bundle = home() / "bundles" / f"{model}-{key}"
    if DEFAULT_BUNDLE_CACHE.holds(bundle):
        problem = _cached_bundle_problem(bundle)
        if problem is None:
            return bundle
        if announce:
            print(f"the cached default bundle is damaged ({problem}); rebuilding it")
        shutil.rmtree(bundle)  # omniedge's own cache, recognised by its .complete marker
    try:
        from omniedge.compress.pipeline import compress
        from omniedge.export.bundle import export_bundle
    except ImportError as e:
        raise OmniedgeError(
            f"building the default model's bundle needs the offline extras ({e.name} is missing)",
            'pip install "omniedge[offline,ort]", or pass a bundle directory you exported elsewhere',
        ) from e
    if progress and announce:
        print(f"building the default model's bundle ({model}) once, into {bundle}")
    if subprocess:
        import subprocess as sp
        import sys

        code = (
            "from omniedge.defaults import default_bundle; "
            f"default_bundle({model!r}, {progress!r}, announce=False)"
        )
        if sp.run([sys.executable, "-c", code]).returncode != 0 or not (bundle / ".complete").is_file():
            raise OmniedgeError(
                f"building the default bundle into {bundle} failed (output above)", "fix and re-run"
            )
        return bundle
    try:
        if not (ckpt / "omniedge.json").is_file():
            from omniedge.compress.recipe import default_recipe

            compress(model, ckpt, default_recipe(), progress=progress)
        export_bundle(ckpt, bundle)
    except OmniedgeError as e:
        raise OmniedgeError(
            f"building the default model's bundle failed: {e.problem}",
            f"delete omniedge's cached copies {ckpt} and {bundle} and run again (they are rebuilt), "
            "or pass a bundle directory you exported",
        ) from e
    (bundle / DEFAULT_BUNDLE_CACHE.marker).write_text(key + "\n")
    return bundle
