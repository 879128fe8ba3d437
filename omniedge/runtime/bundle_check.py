"""A bundle's health: the checks `omniedge run` makes before it loads anything (the manifest, the files it
names, the tokenizer and the embedding table), plus what only a careful look finds (every recorded
checksum, files too small to be what they claim). `omniedge info` reports the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omniedge.errors import OmniedgeError
from omniedge.hashing import file_sha256
from omniedge.runtime.bundle_files import load_embed, load_tokenizer  # the very loaders `run` uses
from omniedge.runtime.manifest import Manifest, load_manifest

# A serialized TensorRT engine holds a header, the network and its weights: kilobytes even for a toy graph.
MIN_ENGINE_BYTES = 1024


@dataclass
class BundleHealth:
    manifest: Manifest | None  # None when the manifest itself cannot be read ...
    damage: list[str] = field(default_factory=list)
    checked_files: int = 0
    fatal: OmniedgeError | None = None  # ... and this says why, with its fix

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.damage


def check_bundle(root: str | Path, checksums: bool = True) -> BundleHealth:
    """Every problem found, not only the first; never raises for a damaged bundle."""
    try:
        m = load_manifest(root)
    except OmniedgeError as e:
        return BundleHealth(None, [e.problem], fatal=e)
    health = BundleHealth(m)
    for load in (lambda: load_tokenizer(m.tokenizer_file), lambda: load_embed(m)):
        try:
            load()
        except OmniedgeError as e:
            health.damage.append(e.problem)
    for c in m.components.values():
        if c.engine is not None and c.engine.is_file() and c.engine.stat().st_size < MIN_ENGINE_BYTES:
            health.damage.append(
                f"{c.engine.name} is {c.engine.stat().st_size} bytes: too small to be a TensorRT engine"
            )
        for p in (c.onnx, c.engine):
            if p is not None and p.is_file() and p.stat().st_size == 0:
                health.damage.append(f"{p.name} is empty (0 bytes)")
        if c.engine is not None and not c.engine.is_file():
            health.damage.append(f"{c.engine.name} (the {c.name} engine) is missing")
        if checksums:
            for name, expected in c.sha256.items():
                health.checked_files += 1
                got = file_sha256(m.root / name)
                if got != expected:
                    health.damage.append(
                        f"{name} is damaged (sha256 {got[:12]}..., the manifest records {expected[:12]}...)"
                    )
    return health
