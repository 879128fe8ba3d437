"""Write tensors one at a time into size-capped safetensors shards, Hugging Face's sharded layout.

One shard: `<prefix>.safetensors`. Several: `<prefix>-00001-of-00003.safetensors` ... plus
`<prefix>.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}), the
layout `weights.SafetensorsDir` and transformers read. Host memory holds at most one shard's tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omniedge.weights import INDEX_SUFFIX


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShardWriter:
    """Collects tensors (moved to CPU) and writes a shard whenever the next tensor would pass `max_bytes`."""

    def __init__(
        self, directory: str | Path, prefix: str, max_bytes: int, metadata: dict[str, str] | None = None
    ) -> None:
        self.dir = Path(directory)
        self.prefix = prefix
        self.max_bytes = int(max_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, Any] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.closed = False

    def add(self, name: str, tensor: Any) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        size = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f".{self.prefix}-{len(self._written) + 1:05d}.part"
        save_file(self._pending, str(path), metadata=self.metadata)
        path.chmod(0o666 & ~_umask())  # safetensors creates 0600; the artifact must read like any file
        self._written.append((path, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index; returns the file names."""
        if self.closed:
            raise ValueError("ShardWriter closed twice")
        self.closed = True
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            path, _ = self._written[0]
            final = self.dir / f"{self.prefix}.safetensors"
            path.rename(final)
            return [final.name]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self._written, start=1):
            final = self.dir / f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final.name)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / f"{self.prefix}{INDEX_SUFFIX}").write_text(json.dumps(index, indent=2) + "\n")
        return [*files, f"{self.prefix}{INDEX_SUFFIX}"]
