"""A seeded random Qwen3-Omni checkpoint made on demand, and a writer of real-format checkpoints.

`RandomSource` answers like `weights.SafetensorsDir` over the real checkpoint (the same canonical names,
per-expert tensors, shapes and bf16 dtype, talker and code2wav included) but makes each tensor when asked,
on the device asked for: a full-size model on a machine whose disk could not hold it. A tensor depends
only on (seed, name, device type): asking twice gives the same values.

`write_checkpoint` writes any source as the Hugging Face sharded layout the real checkpoint uses
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, config.json, tokenizer.json),
optionally only the first N thinker decoder layers, so the real reader is exercised on the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from omniedge.meta_init import empty_model
from omniedge.weights import TensorSource, canonical_name

_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^thinker\.model\.layers\.(\d+)\.")
STD = 0.02  # transformers' initializer_range for Qwen3-Omni
DTYPE = "BF16"  # the published checkpoint is bf16 throughout
SHARD_BYTES = 4 << 30


def on_disk_names(model: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{canonical on-disk name: (shape, init)} of a model's parameters, fused experts split per expert as
    the published checkpoint stores them; init is "ones", "zeros" or "normal"."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        mod_name, _, pname = name.rpartition(".")
        is_norm = "norm" in type(modules[mod_name]).__name__.lower()
        init = ("ones" if pname == "weight" else "zeros") if is_norm else "normal"
        n = canonical_name(name)
        m = _FUSED.match(n)
        if m and p.dim() == 3:
            e, rows, cols = (int(d) for d in p.shape)
            for i in range(e):
                if m["proj"] == "down_proj":
                    out[f"{m['prefix']}.{i}.down_proj.weight"] = ((rows, cols), init)
                else:
                    for half in ("gate_proj", "up_proj"):
                        out[f"{m['prefix']}.{i}.{half}.weight"] = ((rows // 2, cols), init)
        else:
            out[n] = (tuple(int(d) for d in p.shape), init)
    return out


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one tensor: a hash of (seed, canonical name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


class RandomSource:
    """Every tensor of a Qwen3-Omni checkpoint of `config`, random, made on demand (TensorSource)."""

    def __init__(self, config: dict[str, Any], seed: int = 0, layers: int | None = None) -> None:
        from omniedge.models.full import with_layers

        self.config = config if layers is None else with_layers(config, layers)
        self.seed = int(seed)
        self._meta = on_disk_names(empty_model(self.config))

    def names(self) -> list[str]:
        return sorted(self._meta)

    def __contains__(self, name: str) -> bool:
        return canonical_name(name) in self._meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[canonical_name(name)][0]

    def dtype(self, name: str) -> str:
        return DTYPE

    def get(self, name: str, device: Any = None) -> Any:
        import torch

        key = canonical_name(name)
        shape, init = self._meta[key]
        dev = torch.device(device if device is not None else "cpu")
        if init == "ones":
            return torch.ones(shape, dtype=torch.bfloat16, device=dev)
        if init == "zeros":
            return torch.zeros(shape, dtype=torch.bfloat16, device=dev)
        g = torch.Generator(device=dev).manual_seed(tensor_seed(self.seed, key))
        return (torch.randn(shape, generator=g, device=dev) * STD).to(torch.bfloat16)


def layer_of(name: str) -> int | None:
    """Thinker decoder layer index of a canonical name, None outside the decoder layers."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def write_checkpoint(
    source: TensorSource,
    config: dict[str, Any],
    tokenizer: Any,
    out: str | Path,
    layers: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
    device: Any = None,
) -> Path:
    """Write `source` as a Hugging Face sharded checkpoint directory (atomically); with `layers`, only the
    first `layers` thinker decoder layers (config.json says so). Tensors are asked for on `device` (a
    random source makes them there: a GPU is much faster) and written from the CPU. Returns `out`."""
    from tqdm.auto import tqdm

    from omniedge.atomic import atomic_dir
    from omniedge.models.full import with_layers
    from omniedge.models.tokenizer import save_tokenizer
    from omniedge.outputs import WRITTEN_CHECKPOINT
    from omniedge.shards import ShardWriter

    cfg = config if layers is None else with_layers(config, layers)
    keep = int(cfg["thinker_config"]["text_config"]["num_hidden_layers"])
    names = [n for n in source.names() if (layer_of(n) is None or layer_of(n) < keep)]
    with atomic_dir(Path(out), WRITTEN_CHECKPOINT) as tmp:
        writer = ShardWriter(tmp, "model", shard_bytes)
        for n in tqdm(names, desc="writing", unit="tensor", disable=not progress):
            writer.add(n, source.get(n, device))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_tokenizer(tokenizer, tmp)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m omniedge.random_source OUT --model full --layers 4`: write a real-format checkpoint."""
    import argparse

    from omniedge.models.full import RANDOM_MODELS, qwen_id_tokenizer, random_config_dict

    ap = argparse.ArgumentParser(prog="python -m omniedge.random_source", description=main.__doc__)
    ap.add_argument("out", type=Path, help="checkpoint directory to write (must not exist)")
    ap.add_argument("--model", choices=RANDOM_MODELS, default="full")
    ap.add_argument("--layers", type=int, help="thinker decoder layers to keep (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=SHARD_BYTES >> 20)
    ap.add_argument("--device", default="cpu", help="where tensors are made (cuda: much faster)")
    args = ap.parse_args(argv)
    if args.out.exists():
        ap.error(f"{args.out} exists; choose a new directory")
    cfg = random_config_dict(args.model)
    src = RandomSource(cfg, seed=args.seed, layers=args.layers)
    write_checkpoint(
        src, src.config, qwen_id_tokenizer(cfg), args.out, shard_bytes=args.shard_mb << 20, device=args.device
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
