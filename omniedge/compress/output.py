"""Writing the compressed checkpoint as it is made (docs/artifacts.md §1): float tensors to model*.safetensors,
packed INT4 to int4*.safetensors, both sharded with an index when large; never a float copy of a quantized
weight. Names are canonical (on-disk spelling); float experts are stored per expert, as the published
checkpoint stores them. The size is estimated before the long work, and the disk checked against it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from omniedge import int4
from omniedge.compress.prune import PruneStage
from omniedge.compress.quantize import INT4_PREFIX, QuantizeStage, layer_targets
from omniedge.compress.skeleton import ThinkerSkeleton
from omniedge.errors import OmniedgeError
from omniedge.shards import ShardWriter
from omniedge.weights import INDEX_SUFFIX, canonical_name

DROPPED = ("talker", "code2wav")  # text out only: speech output is not carried through (yet)
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _int4_bytes(shape: tuple[int, ...], group: int, symmetric: bool = True) -> int:
    *lead, n, k = shape
    nb = math.ceil(k / group)
    rows = math.prod(lead) * n * nb
    zero_points = 0 if symmetric else math.prod(lead) * n * math.ceil(nb / 2)
    return rows * (group // 2) + rows * 4 + zero_points


def expected_bytes(sk: ThinkerSkeleton, stages: list[Any], dtype: torch.dtype) -> int:
    """Bytes of the tensors the compressed checkpoint will hold (shapes only, nothing is loaded)."""
    prune = next((s for s in stages if isinstance(s, PruneStage)), None)
    quant = next((s for s in stages if isinstance(s, QuantizeStage)), None)
    size = _dtype_bytes(dtype)
    total = 0
    for layer in sk.layers:
        quantized = (
            {local for local, _, _ in layer_targets(layer, quant.settings.targets)} if quant else set()
        )
        e = int(layer.mlp.gate.weight.shape[0]) if hasattr(layer.mlp, "experts") else 0
        li = sk.layer_index(layer)
        for name, p in layer.named_parameters():
            shape = tuple(int(d) for d in p.shape)
            if prune is not None and e and shape and shape[0] == e and name.startswith("mlp."):
                # a global budget is decided later: its per-layer counts average to the uniform keep
                shape = (prune.counts.get(li, prune.keep) if li is not None else prune.keep, *shape[1:])
            if name in quantized and quant is not None:
                total += _int4_bytes(shape, quant.settings.group_size, quant.settings.symmetric)
            else:
                total += math.prod(shape) * size
    head_int4 = quant is not None and "lm_head" in quant.settings.targets
    for name, p in sk.model.named_parameters():
        cname = canonical_name(name)
        if cname == "thinker.lm_head.weight" and head_int4 and quant is not None:
            total += _int4_bytes(tuple(p.shape), quant.settings.group_size, quant.settings.symmetric)
        elif not cname.startswith("thinker.model.layers."):
            total += p.numel() * size
    return total


def part_of(name: str) -> str:
    """Which part of the thinker a canonical name belongs to: text, audio or vision."""
    if name.startswith("thinker.audio_tower."):
        return "audio"
    if name.startswith("thinker.visual."):
        return "vision"
    return "text"


def teacher_bf16_bytes(sk: ThinkerSkeleton) -> dict[str, int]:
    """Bytes of the teacher's thinker in bf16, per part (before any stage)."""
    out: dict[str, int] = {}
    for name, p in sk.model.named_parameters():
        part = part_of(canonical_name(name))
        out[part] = out.get(part, 0) + 2 * p.numel()
    return dict(sorted(out.items()))


def check_disk(out: Path, need: int) -> None:
    """Refuse before the long work when the output's filesystem cannot hold `need` bytes (plus 2%)."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need * 1.02 + (64 << 20):
        raise OmniedgeError(
            f"{parent} has {free / 2**30:.2f} GiB free; the compressed checkpoint needs about "
            f"{need / 2**30:.2f} GiB",
            "free some space, or write the output (-o) to a larger disk",
        )


class CheckpointWriter:
    """Streams one checkpoint's tensors into `directory` (a temporary directory renamed at the end)."""

    def __init__(
        self, directory: Path, dtype: torch.dtype, shard_bytes: int, quant: QuantizeStage | None
    ) -> None:
        self.dir, self.dtype = directory, dtype
        self.floats = ShardWriter(directory, "model", shard_bytes)
        meta = {"format": "omniedge-int4", "bits": str(int4.BITS)}
        if quant is not None:
            meta["group_size"] = str(quant.settings.group_size)
            meta["zero_point"] = str(int4.ZERO_POINT) if quant.settings.symmetric else "per-group"
        self.int4 = ShardWriter(directory, INT4_PREFIX, shard_bytes, meta)
        self.int4_count = 0
        self._bytes: dict[str, dict[str, int]] = {}

    def _count(self, name: str, kind: str, tensor: Any) -> None:
        part = self._bytes.setdefault(part_of(name), {"float": 0, "int4": 0})
        part[kind] += tensor.numel() * tensor.element_size()

    def _float(self, name: str, tensor: Any) -> None:
        t = tensor.to(self.dtype)
        self._count(name, "float", t)
        self.floats.add(name, t)

    def bytes_by_part(self) -> dict[str, dict[str, int]]:
        """Bytes written per part (text decoder + embeddings + head, audio encoder, vision encoder)."""
        return {k: dict(v) for k, v in sorted(self._bytes.items())}

    def add_module(self, sk: ThinkerSkeleton, module: torch.nn.Module) -> None:
        """Every (float) parameter of a loaded non-layer module: embeddings, encoders, norm, lm_head."""
        params = dict(module.named_parameters())
        for local, name in sk.canonical(module).items():
            self._float(name, params[local])

    def add_layer(self, sk: ThinkerSkeleton, layer: torch.nn.Module, packed: dict[str, Any]) -> None:
        """One finished layer: packed INT4 (quantizers.Packed by canonical name) and every float tensor."""
        params = dict(layer.named_parameters())
        for local, name in sk.canonical(layer).items():
            if name in packed:
                for key, t in packed[name].tensors(name).items():
                    self._count(name, "int4", t)
                    self.int4.add(key, t)
                self.int4_count += 1
            elif local in _EXPERTS:  # float experts: per expert, as the published checkpoint
                w = params[local]
                prefix = name.rsplit(".", 1)[0]
                for e in range(w.shape[0]):
                    if local.endswith("down_proj"):
                        self._float(f"{prefix}.{e}.down_proj.weight", w[e])
                    else:
                        gate, up = w[e].chunk(2, dim=0)
                        self._float(f"{prefix}.{e}.gate_proj.weight", gate)
                        self._float(f"{prefix}.{e}.up_proj.weight", up)
            else:
                self._float(name, params[local])

    def add_packed(self, name: str, packed: Any) -> None:
        """One quantized weight outside the decoder layers (the lm_head): its packed INT4 tensors."""
        for key, t in packed.tensors(name).items():
            self._count(name, "int4", t)
            self.int4.add(key, t)
        self.int4_count += 1

    def close(self) -> dict[str, list[str]]:
        out = {"model": self.floats.close()}
        if self.int4_count:
            out["int4"] = self.int4.close()
        return out


def int4_file(files: list[str]) -> str:
    """What `omniedge_quantization.file` names: the single file, or the index of the shards."""
    return next((f for f in files if f.endswith(INDEX_SUFFIX)), files[0])


def output_config(
    source: dict[str, Any], stages: list[Any], int4_files: list[str] | None, dtype: torch.dtype
) -> dict[str, Any]:
    """config.json of the compressed checkpoint: experts kept, text out only, the INT4 entry."""
    cfg = json.loads(json.dumps(source))
    cfg["enable_audio_output"] = False
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    for s in stages:
        s.config_updates(cfg["thinker_config"]["text_config"])
        if isinstance(s, QuantizeStage) and int4_files:
            cfg["omniedge_quantization"] = s.config(int4_file(int4_files))
    return cfg


def write_side_files(
    directory: Path, source_path: Path | None, tokenizer: Any, config: dict[str, Any]
) -> None:
    """config.json, generation_config.json (the source's, else one derived from the config), tokenizer."""
    from omniedge.models.tokenizer import save_tokenizer

    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = source_path / "generation_config.json" if source_path is not None else None
    if gen is not None and gen.is_file():
        shutil.copyfile(gen, directory / "generation_config.json")
    save_tokenizer(tokenizer, directory)
