"""Read a checkpoint's tensors one at a time, by one spelling of their names, whatever wrote them.

Every offline stage streams weights through this interface instead of loading a whole model: the real
Qwen3-Omni checkpoint (sharded safetensors, per-expert tensor names), a compressed omniedge checkpoint
(float tensors + packed INT4), or a seeded random source of the same names and shapes (a full-size model
made on the machine that measures it). A source gives names, shapes and dtypes without reading data,
and one tensor per `get`.

Names are canonical (`canonical_name`): the on-disk spelling `thinker.model.layers.N...`, whatever
transformers release wrote them. Experts are per expert on disk (`...mlp.experts.E.gate_proj.weight`);
`fused_experts` gives transformers' fused layout ([E, 2I, H] gate rows first, [E, H, I]).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from omniedge.errors import OmniedgeError

INDEX_SUFFIX = ".safetensors.index.json"
_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


def canonical_name(name: str) -> str:
    """One spelling for a parameter whatever the transformers release or file it came from.

    On-disk checkpoints and transformers 5.17 say `thinker.model.layers...`, `thinker.audio_tower...`,
    `thinker.visual...`; transformers >= 5.2x in memory says `thinker.model.language_model.layers...`,
    `thinker.model.audio_tower...`, `thinker.model.visual...`. A bare thinker lacks the `thinker.` prefix.
    Talker and code2wav names pass through unchanged.
    """
    if name.startswith(("talker.", "code2wav.")):
        return name
    n = name if name.startswith("thinker.") else f"thinker.{name}"
    for new_style, old_style in (
        ("thinker.model.language_model.", "thinker.model."),
        ("thinker.model.audio_tower.", "thinker.audio_tower."),
        ("thinker.model.visual.", "thinker.visual."),
    ):
        if n.startswith(new_style):
            return old_style + n[len(new_style) :]
    return n


def layer_prefix(layer: int) -> str:
    """Canonical prefix of thinker text decoder layer `layer`."""
    return f"thinker.model.layers.{layer}."


@runtime_checkable
class TensorSource(Protocol):
    """Tensors by canonical name, one at a time. `get` returns a torch tensor on `device` (CPU default)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> str: ...  # safetensors dtype string: "BF16", "F32", "U8", ...

    def get(self, name: str, device: Any = None) -> Any: ...


class SafetensorsDir:
    """Every `*.safetensors` file of a directory (sharded or not), read lazily, names canonical.

    With `model.safetensors.index.json` (the Hugging Face sharded layout) the index says which shard holds
    what, and a shard it names that is missing is an error up front, not halfway through a long job.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        files = self._files()
        self._where: dict[str, tuple[Path, str]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._handles: dict[Path, Any] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own types for damaged headers
                raise OmniedgeError(
                    f"{f} is not a readable safetensors file ({e})", "copy the checkpoint again"
                ) from e
            self._handles[f] = h
            for raw in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = h.get_slice(raw)
                self._where[canonical_name(raw)] = (f, raw)
                self._meta[canonical_name(raw)] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))

    def _files(self) -> list[Path]:
        if not self.path.is_dir():
            raise OmniedgeError(f"checkpoint not found: {self.path}", "pass the checkpoint directory")
        files: set[Path] = set()
        for index in sorted(self.path.glob(f"*{INDEX_SUFFIX}")):
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise OmniedgeError(
                    f"{index} is not a safetensors index ({e})", "copy the checkpoint again"
                ) from e
            shards = {self.path / str(s) for s in weight_map.values()}
            missing = sorted(s.name for s in shards if not s.is_file())
            if missing:
                raise OmniedgeError(
                    f"{self.path} is missing {len(missing)} shard(s) its index names: {', '.join(missing[:4])}"
                    + (" ..." if len(missing) > 4 else ""),
                    "copy every model-*.safetensors file of the checkpoint",
                )
            files |= shards
        files |= set(self.path.glob("*.safetensors"))
        if not files:
            raise OmniedgeError(f"{self.path} has no *.safetensors files", "copy the weights too")
        return sorted(files)

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return canonical_name(name) in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._key(name)][0]

    def dtype(self, name: str) -> str:
        return self._meta[self._key(name)][1]

    def file_of(self, name: str) -> Path:
        return self._where[self._key(name)][0]

    def get(self, name: str, device: Any = None) -> Any:
        f, raw = self._where[self._key(name)]
        t = self._handles[f].get_tensor(raw)
        return t if device is None else t.to(device)

    def _key(self, name: str) -> str:
        key = canonical_name(name)
        if key not in self._where:
            raise OmniedgeError(
                f"{self.path} has no tensor {name}", "check that it is a Qwen3-Omni checkpoint"
            )
        return key


def expert_names(source: TensorSource, layer: int) -> dict[int, dict[str, str]]:
    """{expert index: {"gate_proj"/"up_proj"/"down_proj": canonical name}} of one layer's per-expert tensors."""
    out: dict[int, dict[str, str]] = {}
    prefix = layer_prefix(layer)
    for n in source.names():
        if not n.startswith(prefix):
            continue
        m = _EXPERT.match(n)
        if m:
            out.setdefault(int(m["e"]), {})[m["proj"]] = n
    return out


def fused_experts(source: TensorSource, layer: int, device: Any = None) -> tuple[Any, Any] | None:
    """(gate_up [E, 2I, H] gate rows first, down [E, H, I]) of one layer in transformers' fused layout, from
    per-expert or already fused tensors; None when the layer has no float experts (dense or quantized)."""
    import torch

    fused = f"{layer_prefix(layer)}mlp.experts."
    names = set(source.names())
    if f"{fused}gate_up_proj" in names:
        return source.get(f"{fused}gate_up_proj", device), source.get(f"{fused}down_proj", device)
    per = expert_names(source, layer)
    if not per:
        return None
    order = sorted(per)
    if order != list(range(len(order))) or any(len(p) != 3 for p in per.values()):
        raise OmniedgeError(
            f"layer {layer}'s experts are incomplete in the checkpoint (found {len(order)} experts)",
            "copy every shard of the checkpoint",
        )
    gate_up = torch.stack(
        [
            torch.cat([source.get(per[e]["gate_proj"], device), source.get(per[e]["up_proj"], device)])
            for e in order
        ]
    )
    down = torch.stack([source.get(per[e]["down_proj"], device) for e in order])
    return gate_up, down


def iter_prefixed(source: TensorSource, prefix: str) -> Iterator[tuple[str, Any]]:
    """(name without `prefix`, tensor) for every tensor under `prefix` (e.g. one encoder's state dict)."""
    for n in source.names():
        if n.startswith(prefix):
            yield n[len(prefix) :], source.get(n)
