"""INT4 of the thinker's decoder layers, one layer at a time, behind a pluggable quantizer.

A quantizer is a function of one weight [..., N, K] (a Linear [N, K] or fused experts [E, N, K]), the
calibration inputs that reach it (`WeightInputs`, given only to quantizers that ask for them) and the
quantize settings; it returns the packed tensors of omniedge.int4's layout (qweight uint8 [..., N, nb,
g/2], scales float32 [..., N, nb]). RTN is built in; GPTQ/AWQ-style quantizers plug in with
`register_quantizer(name, fn, needs_inputs=True)` without touching the pipeline.

The layer keeps computing with the dequantized weights (gpt-fast's `convert_for_runtime`), so quality is
measured on exactly the numbers the exported graphs run; the packed tensors go to int4.safetensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from omniedge import int4

INT4_PREFIX = "int4"  # int4.safetensors (or int4-0000i-of-0000n.safetensors + int4.safetensors.index.json)
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # fused [E, N, K]: gate_up [E, 2I, H], down [E, H, I]


class WeightInputs:
    """The calibration activations that reach one weight, computed when asked.

    For a Linear: `rows()` -> [T, K], every calibration token's input. For fused experts: `rows(e)` ->
    [T_e, K], the inputs of the tokens the teacher's router sent to (kept) expert e, and `tokens(e)` the
    number of them (quantizers need a fallback for experts with few tokens).
    """

    def __init__(
        self, rows: Callable[[int | None], torch.Tensor], tokens: Callable[[int], int] | None = None
    ):
        self._rows, self._tokens = rows, tokens

    def rows(self, expert: int | None = None) -> torch.Tensor:
        return self._rows(expert)

    def tokens(self, expert: int) -> int:
        if self._tokens is None:
            raise ValueError("a Linear's inputs have no experts")
        return self._tokens(expert)


Quantizer = Callable[[torch.Tensor, WeightInputs | None, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class QuantizerEntry:
    fn: Quantizer
    needs_inputs: bool


def rtn(
    weight: torch.Tensor, inputs: WeightInputs | None, settings: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest, symmetric, one scale per group (omniedge.int4.quantize)."""
    return int4.quantize(weight, int(settings["group_size"]))


QUANTIZERS: dict[str, QuantizerEntry] = {"rtn": QuantizerEntry(rtn, needs_inputs=False)}


def register_quantizer(name: str, fn: Quantizer, needs_inputs: bool = False) -> None:
    """Make a quantizer selectable as `quantize: {method: <name>}` in a recipe."""
    QUANTIZERS[name] = QuantizerEntry(fn, needs_inputs)


def layer_targets(layer: Any, targets: list[str]) -> list[tuple[str, Any, str]]:
    """(name inside the layer, owning module, parameter name) of every weight the recipe's targets name."""
    out: list[tuple[str, Any, str]] = []
    if "attention" in targets:
        for proj in ATTENTION_PROJS:
            mod = getattr(layer.self_attn, proj, None)
            if mod is not None:
                out.append((f"self_attn.{proj}.weight", mod, "weight"))
    experts = getattr(layer.mlp, "experts", None)
    if "experts" in targets and experts is not None:
        for pname in EXPERT_PARAMS:
            p = getattr(experts, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                out.append((f"mlp.experts.{pname}", experts, pname))
    return out


class QuantizeStage:
    """`quantize` recipe stage: per layer, quantize the targets, compute on with the dequantized weights."""

    name = "quantize"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.entry = QUANTIZERS[settings["method"]]
        self.in_features: dict[str, int] = {}  # canonical name -> K, for every quantized weight
        self.bytes = 0

    @property
    def needs_inputs(self) -> bool:
        return self.entry.needs_inputs

    def apply_layer(
        self, layer: Any, prefix: str, inputs: Callable[[str], WeightInputs] | None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Quantize one layer in place; returns {canonical name: (qweight, scales)} on the CPU.
        `prefix` is the layer's canonical prefix; `inputs(name inside the layer)` gives WeightInputs."""
        packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for local, owner, pname in layer_targets(layer, list(self.settings["targets"])):
            p = getattr(owner, pname)
            x = inputs(local) if (self.needs_inputs and inputs is not None) else None
            q, s = self.entry.fn(p.detach(), x, self.settings)
            k = int(p.shape[-1])
            with torch.no_grad():
                p.copy_(int4.dequantize(q, s, k).to(device=p.device, dtype=p.dtype))
            name = prefix + local
            packed[name] = (q.cpu(), s.cpu())
            self.in_features[name] = k
            self.bytes += q.numel() + s.numel() * s.element_size()
        return packed

    def config(self, file: str) -> dict[str, Any]:
        """The `omniedge_quantization` entry of config.json (docs/artifacts.md §1)."""
        return {
            "method": self.settings["method"],
            "bits": int4.BITS,
            "group_size": int(self.settings["group_size"]),
            "symmetric": True,
            "zero_point": int4.ZERO_POINT,
            "file": file,
            "modules": sorted(self.in_features),
            "in_features": dict(sorted(self.in_features.items())),
        }

    def result(self) -> dict[str, Any]:
        return {"modules": len(self.in_features), "int4_bytes": self.bytes}
