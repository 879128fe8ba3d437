"""The quantizer interface: a weight [..., N, K] (and what calibration saw of its inputs) -> packed INT4.

Every quantizer writes omniedge.int4's layout (uint8 codes [..., N, ceil(K/g), g/2], float32 scales
[..., N, ceil(K/g)], zero point 8 or packed asymmetric zero points), so the exporter maps any of them to
MatMulNBits / QMoE. gpt-fast's two verbs: `create_quantized_state_dict` makes the packed tensors,
`convert_for_runtime` writes their dequantized values back into the float parameters, so PyTorch
(evaluation, and the next layer's calibration inputs) computes with exactly the exported numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from omniedge import int4
from omniedge.compress.quantizers.observer import InputStats
from omniedge.errors import OmniedgeError

GROUP_SIZES = (32, 64, 128)  # block sizes MatMulNBits and QMoE take that divide Qwen3-Omni's widths


def check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise OmniedgeError(
            f"INT4 group size {group_size!r} is not supported",
            f"use one of {list(GROUP_SIZES)} (ONNX Runtime's MatMulNBits / QMoE block sizes)",
        )
    return int(group_size)


def refuse_quantized(config: Any) -> None:
    """A clear error when a model (config object or dict) was already quantized: quantizing the
    dequantized weights again would compound the error silently."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    for key in ("omniedge_quantization", "quantization_config"):
        if get(key):
            raise OmniedgeError(
                f"the model is already quantized ({key} in its config)",
                "quantize the original float checkpoint instead",
            )


def check_float_weight(w: torch.Tensor) -> None:
    if not w.is_floating_point():
        raise OmniedgeError(
            f"a weight of dtype {w.dtype} is already quantized", "quantize the original float checkpoint"
        )
    if w.dim() < 2:
        raise ValueError(f"a weight to quantize needs shape [..., N, K], got {tuple(w.shape)}")


@dataclass(frozen=True)
class Codes:
    """Unpacked quantization of a weight: codes 0..15 [..., N, nb, g], scales and zero points [..., N, nb]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor  # all 8 when symmetric

    def dequantize(self, k: int) -> torch.Tensor:
        w = (self.codes.float() - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)
        return w.flatten(-2)[..., :k]


@dataclass(frozen=True)
class Packed:
    """One quantized weight in omniedge.int4's layout. `fallback`: experts that lacked calibration tokens
    and were quantized by the documented fallback instead (0 for a 2-D weight that had enough)."""

    qweight: torch.Tensor  # uint8 [..., N, nb, g/2]
    scales: torch.Tensor  # float32 [..., N, nb]
    zero_points: torch.Tensor | None  # uint8 [..., N, ceil(nb/2)], None = the implicit 8
    k: int
    fallback: int = 0

    @classmethod
    def from_codes(cls, c: Codes, k: int, symmetric: bool, fallback: int = 0) -> Packed:
        zp = None if symmetric else int4.pack_zero_points(c.zeros.round().to(torch.uint8))
        return cls(int4.pack(c.codes), c.scales.float().contiguous(), zp, k, fallback)

    @property
    def group_size(self) -> int:
        return int(self.qweight.shape[-1]) * 2

    def dequantize(self) -> torch.Tensor:
        return int4.dequantize(self.qweight, self.scales, self.k, self.zero_points)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Checkpoint entries: `<name>.qweight`, `.scales` and, when asymmetric, `.zero_points` (CPU)."""
        out = {f"{name}.qweight": self.qweight.cpu(), f"{name}.scales": self.scales.cpu()}
        if self.zero_points is not None:
            out[f"{name}.zero_points"] = self.zero_points.cpu()
        return out


class Quantizer(ABC):
    """One INT4 method. Subclasses are frozen dataclasses of their settings (validated on creation).

    The pipeline calls, per group of weights that share one input (q/k/v; all experts' gate_up_proj;
    each expert's down_proj; o_proj):
      s = quantizer.input_scale(weights, stats)      # None except for AWQ
      if s is not None: fold s (awq.fold_into_layer), then weights *= s and stats = stats.scaled(s)
      packed = quantizer.quantize(weight, stats)     # per weight
    `needs_hessian` / `needs_samples` tell the calibration pass what to observe (InputObserver)."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    needs_samples: ClassVar[bool] = False
    group_size: int
    symmetric: bool

    def input_scale(
        self,
        weights: Sequence[torch.Tensor],
        stats: InputStats,
        *,
        per_expert: bool = False,
        tie: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """A per-input-channel scale to fold into the op before these weights (AWQ); None for others.
        `per_expert`: one scale per expert ([E, K], for down_proj) instead of one shared ([K]);
        `tie`: makes channels that must share a scale equal (awq.tie_kv_heads for o_proj)."""
        return None

    @abstractmethod
    def quantize(self, w: torch.Tensor, stats: InputStats | None = None) -> Packed:
        """w [N, K] (a Linear) or [E, N, K] (fused experts; stats per expert) -> Packed."""

    def quantize_together(
        self, weights: Sequence[torch.Tensor], stats: InputStats | None = None
    ) -> list[Packed]:
        """Linears [N_i, K] that share one input (q/k/v) as one [sum N_i, K] weight, split again: every
        method treats output rows independently, so this equals quantizing them one by one, in one pass
        (GPTQ walks the K columns once instead of three times)."""
        if any(w.dim() != 2 for w in weights):
            raise ValueError("quantize_together takes 2-D weights that share one input")
        packed = self.quantize(torch.cat(list(weights)), stats)
        out, start = [], 0
        for w in weights:
            rows = slice(start, start + w.shape[0])
            zp = None if packed.zero_points is None else packed.zero_points[rows]
            out.append(Packed(packed.qweight[rows], packed.scales[rows], zp, packed.k, packed.fallback))
            start += w.shape[0]
        return out


def create_quantized_state_dict(
    quantizer: Quantizer,
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, InputStats] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """({name.qweight/.scales[/.zero_points]: CPU tensors}, {name: report}) for the named weights
    (input scales already folded). The report gives, per weight, the experts that used the fallback and
    the relative output error on the calibration inputs when they were observed."""
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, w in weights.items():
        st = (stats or {}).get(name)
        packed = quantizer.quantize(w, st)
        tensors.update(packed.tensors(name))
        report[name] = {"fallback_experts": packed.fallback}
        if st is not None:
            report[name]["relative_output_error"] = relative_output_error(w, packed.dequantize(), st)
    return tensors, report


def convert_for_runtime(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Overwrite each named float parameter with the dequantized value of its packed tensors."""
    with torch.no_grad():
        for name, p in params.items():
            w = int4.dequantize(
                tensors[f"{name}.qweight"],
                tensors[f"{name}.scales"],
                int(p.shape[-1]),
                tensors.get(f"{name}.zero_points"),
            )
            p.copy_(w.to(device=p.device, dtype=p.dtype))


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, stats: InputStats) -> float:
    """sum ||(W - W_hat) x||^2 / sum ||W x||^2 over the observed inputs (Hessian when kept, else the
    sampled rows), all experts together."""
    d = (w.float() - w_hat.to(w.device).float()).flatten(0, -3) if w.dim() > 2 else (w - w_hat).float()[None]
    ref = w.float().flatten(0, -3) if w.dim() > 2 else w.float()[None]
    if stats.hessian is not None:
        h = stats.hessian.reshape(-1, *stats.hessian.shape[-2:]).to(d.device)
        num = torch.einsum("enk,ekl,enl->", d, h, d)
        den = torch.einsum("enk,ekl,enl->", ref, h, ref)
    elif stats.samples is not None:
        x = stats.samples.reshape(-1, *stats.samples.shape[-2:]).to(d.device)
        num = torch.bmm(x, d.transpose(1, 2)).square().sum()
        den = torch.bmm(x, ref.transpose(1, 2)).square().sum()
    else:
        raise ValueError("the statistics hold neither a Hessian nor input samples")
    return float(num / den.clamp_min(torch.finfo(torch.float32).tiny))
