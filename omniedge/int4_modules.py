"""A compressed checkpoint (docs/artifacts.md §1) loaded into transformers with INT4 weights kept packed.

The model is built on the meta device (accelerate's init_empty_weights), so no float copy of a quantized
weight is ever made at load: quantized Linears become `Int4Linear` and quantized fused experts become a
subclass of transformers' own experts module whose `gate_up_proj` / `down_proj` are dequantized for the
duration of one forward call (one layer at a time), so every experts implementation of the installed
transformers (eager, batched_mm, grouped_mm) runs unchanged. Dequantization is omniedge.int4's, so the
numbers are those the exported graphs compute with. `dequantize=True` instead gives an ordinary float model
(what `omniedge export` reads until it streams INT4 itself).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omniedge import int4
from omniedge.errors import OmniedgeError
from omniedge.meta_init import empty_model, set_parameter
from omniedge.weights import SafetensorsDir, canonical_name, fused_experts

_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_LAYER = re.compile(r"^thinker\.model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_REDO = "re-run `omniedge compress` to rewrite the checkpoint"
EXPERTS_PER_LAYER = "omniedge_experts_per_layer"  # text config: expert count per decoder layer (non-uniform)


class Int4Linear(nn.Module):
    """nn.Linear whose weight is kept as packed INT4 (qweight, scales) and dequantized per call."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        zero_points: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, int(qweight.shape[0])
        self.compute_dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        w = int4.dequantize(self.qweight, self.scales, self.in_features, self.zero_points)
        return w.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Int4Experts:
    """Mixin over transformers' fused experts class: packed buffers, float weights only inside forward."""

    _int4_k: dict[str, int]
    _int4_dtype: torch.dtype
    _int4_float: dict[str, torch.Tensor] | None = None

    def _weight(self, name: str) -> torch.Tensor:
        if self._int4_float is not None:
            return self._int4_float[name]
        buf = self._buffers  # type: ignore[attr-defined]
        q, s, zp = buf[f"{name}_qweight"], buf[f"{name}_scales"], buf.get(f"{name}_zero_points")
        return int4.dequantize(q, s, self._int4_k[name], zp).to(self._int4_dtype)

    gate_up_proj = property(lambda self: self._weight("gate_up_proj"))
    down_proj = property(lambda self: self._weight("down_proj"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._int4_float = {n: self._weight(n) for n in self._int4_k}
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._int4_float = None


_SUBCLASSES: dict[type, type] = {}


Packed = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # qweight, scales, zero points (None: 8)


def make_int4_experts(module: nn.Module, packed: dict[str, tuple[Packed, int]], dtype: torch.dtype) -> None:
    """Turn a transformers experts module in place into its INT4 subclass holding `packed`
    ({param: ((qweight, scales, zero points), K)})."""
    cls = type(module)
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Int4{cls.__name__}", (_Int4Experts, cls), {})
    module.__class__ = _SUBCLASSES[cls]
    module._int4_k = {}  # type: ignore[attr-defined]
    module._int4_dtype = dtype  # type: ignore[attr-defined]
    for name, ((q, s, zp), k) in packed.items():
        module._parameters.pop(name, None)
        module.register_buffer(f"{name}_qweight", q)
        module.register_buffer(f"{name}_scales", s)
        if zp is not None:
            module.register_buffer(f"{name}_zero_points", zp)
        module._int4_k[name] = k  # type: ignore[attr-defined]


def _packed(source: SafetensorsDir, name: str, k: int, symmetric: bool) -> Packed:
    try:
        q, s = source.get(f"{name}.qweight"), source.get(f"{name}.scales")
        zp = None if symmetric else source.get(f"{name}.zero_points")
    except OmniedgeError:
        what = "qweight, scales or zero_points" if not symmetric else "qweight or scales"
        raise OmniedgeError(f"{source.path} lacks {name}'s {what}", _REDO) from None
    nb = q.shape[-2] if q.dim() >= 2 else 0
    if q.dtype != torch.uint8 or q.shape[:-2] != s.shape[:-1] or nb != -(-k // (2 * q.shape[-1])):
        raise OmniedgeError(f"{source.path}: {name} is not in the INT4 layout of omniedge.int4", _REDO)
    if zp is not None and (zp.dtype != torch.uint8 or tuple(zp.shape) != (*s.shape[:-1], -(-nb // 2))):
        raise OmniedgeError(
            f"{source.path}: {name}.zero_points is not packed as omniedge.int4 packs them", _REDO
        )
    return q, s.to(torch.float32), zp


def experts_per_layer(text_config: Any) -> list[int] | None:
    """A non-uniformly pruned checkpoint's expert count per decoder layer (None when every MoE layer has
    `num_experts`): text config `omniedge_experts_per_layer`."""
    get = text_config.get if isinstance(text_config, dict) else lambda k, d=None: getattr(text_config, k, d)
    counts = get(EXPERTS_PER_LAYER, None)
    return [int(c) for c in counts] if counts else None


def resize_experts(model: Any, counts: list[int]) -> None:
    """Give each MoE layer of a (meta-device) model its own expert count, before its weights load."""
    from omniedge.models.family import moe_blocks

    for li, block in moe_blocks(model):
        e = counts[li]
        for module in (block.gate, block.experts):
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.dim() >= 2 and p.shape[0] != e:
                    module._parameters[pname] = nn.Parameter(
                        torch.empty((e, *p.shape[1:]), dtype=p.dtype, device=p.device), requires_grad=False
                    )
            if hasattr(module, "num_experts"):
                module.num_experts = e


def load_quantized(path: Path, dtype: torch.dtype, dequantize: bool = False) -> Any:
    """Qwen3OmniMoeForConditionalGeneration of an omniedge checkpoint (INT4, or pruned to a different
    expert count per layer), eval mode, nothing on meta."""
    import json

    from transformers import GenerationConfig, Qwen3OmniMoeConfig

    raw = json.loads((path / "config.json").read_text())
    q = raw.get("omniedge_quantization") or {}
    symmetric = bool(q.get("symmetric", True))
    if q and (
        q.get("bits") != int4.BITS or (symmetric and q.get("zero_point", int4.ZERO_POINT) != int4.ZERO_POINT)
    ):
        raise OmniedgeError(
            f"{path}: omniedge_quantization is not 4-bit with zero point 8 or per-group", _REDO
        )
    f = path / str(q.get("file", "int4.safetensors"))
    if q and not f.is_file():
        raise OmniedgeError(f"{path} says it is INT4 but has no {f.name}", _REDO)
    model = empty_model(Qwen3OmniMoeConfig.from_pretrained(path), dtype)
    counts = experts_per_layer(raw.get("thinker_config", {}).get("text_config", {}))
    if counts is not None:
        resize_experts(model, counts)
    source = SafetensorsDir(path)
    params = {canonical_name(n): n for n, _ in model.named_parameters()}
    k_of = q.get("in_features") or {}
    experts: dict[str, dict[str, tuple[Packed, int]]] = {}
    for name in q.get("modules", []):
        cname = canonical_name(name)
        if cname not in params:
            raise OmniedgeError(f"{path} quantizes {name}, which the model does not have", _REDO)
        mem = params.pop(cname)
        owner_name, _, pname = mem.rpartition(".")
        owner = model.get_submodule(owner_name)
        k = int(k_of.get(cname) or getattr(owner, pname).shape[-1])
        qw, sc, zp = _packed(source, cname, k, symmetric)
        if dequantize:
            set_parameter(model, mem, int4.dequantize(qw, sc, k, zp).to(dtype))
        elif isinstance(owner, nn.Linear) and pname == "weight":
            bias_name = f"{owner_name}.bias"
            bias = source.get(canonical_name(bias_name)).to(dtype) if owner.bias is not None else None
            params.pop(canonical_name(bias_name), None)
            parent_name, _, child = owner_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Int4Linear(qw, sc, k, bias, dtype, zp))
        elif pname in _EXPERT_PARAMS:
            experts.setdefault(owner_name, {})[pname] = ((qw, sc, zp), k)
        else:
            set_parameter(model, mem, int4.dequantize(qw, sc, k, zp).to(dtype))
    for owner_name, packed in experts.items():
        make_int4_experts(model.get_submodule(owner_name), packed, dtype)
    fused: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for cname, mem in params.items():
        m = _LAYER.match(cname)
        if m:  # float experts are stored per expert
            layer = int(m.group(1))
            if layer not in fused:
                fused[layer] = fused_experts(source, layer)
            pair = fused[layer]
            if pair is None:
                raise OmniedgeError(f"{path} has no experts for layer {layer}", _REDO)
            t = pair[_EXPERT_PARAMS.index(m.group(2))]
        else:
            t = source.get(cname)
        set_parameter(model, mem, t.to(dtype))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
