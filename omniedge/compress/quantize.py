"""The `quantize` stage: INT4 of the thinker's decoder layers, one layer at a time, by any quantizer of
omniedge.compress.quantizers (RTN with or without clip search, GPTQ, AWQ, or a registered one).

Per layer, in the order AWQ needs (each group of weights that share one input: q/k/v; o_proj; every
expert's gate_up_proj; each expert's down_proj):
  stats = the teacher's calibration inputs of the group (layer_inputs: experts see only the tokens the
          pruned router sends them)
  s = quantizer.input_scale(...)   -> folded into the op before (awq.fold_into_layer), stats / s
  packed = quantizer.quantize(weight, stats)
then the layer computes on with the dequantized weights (gpt-fast's `convert_for_runtime`), so quality is
measured on exactly the numbers the exported graphs run; the packed tensors go to int4.safetensors.
Routers, norms, embeddings and the encoders stay float; the lm_head is quantized when `targets` names
`lm_head` (after the layers, with the stage's quantizer when it needs no calibration inputs, else RTN: no
calibration activations are kept for it), and only the stages from this one on are scored with it.

Reconstruction error (the report): per weight, sum ||(W - W_hat) x||^2 / sum ||W x||^2 over a seeded
sample of `samples` calibration rows (per expert for the fused experts), the same rows for every method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from omniedge import int4
from omniedge.compress.layer_inputs import Want
from omniedge.compress.quantizers import QUANTIZERS, Packed, Quantizer, make_quantizer, relative_output_error
from omniedge.compress.quantizers.awq import fold_into_layer, tie_kv_heads
from omniedge.compress.quantizers.base import GROUP_SIZES
from omniedge.compress.quantizers.observer import InputStats
from omniedge.compress.recipe import (
    as_bool,
    as_choice,
    as_int,
    recipe_error,
)
from omniedge.compress.stages import LayerWork, ModelFacts, Stage
from omniedge.errors import OmniedgeError

INT4_PREFIX = "int4"  # int4.safetensors (or int4-0000i-of-0000n.safetensors + int4.safetensors.index.json)
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # fused [E, N, K]: gate_up [E, 2I, H], down [E, H, I]
TARGETS = ("attention", "experts")  # the default targets
ALL_TARGETS = (*TARGETS, "lm_head")
COMMON = ("method", "bits", "group_size", "symmetric", "targets", "samples")


@dataclass(frozen=True)
class QuantizeSettings:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128  # 32, 64 or 128 (MatMulNBits / QMoE block sizes)
    symmetric: bool = True  # False: a zero point per group (exported as MatMulNBits / QMoE zero points)
    targets: tuple[str, ...] = TARGETS
    samples: int = 128  # calibration rows kept per weight (per expert): AWQ's search, the report's error
    options: dict[str, Any] = field(
        default_factory=dict
    )  # the method's own fields (clip_search, act_order...)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "quantize") -> QuantizeSettings:
        d = dict(raw or {})
        if not isinstance(raw, Mapping):
            raise recipe_error(where, f"expected a mapping, got {raw!r}", "write `key: value` pairs")
        method = as_choice(d.pop("method", "rtn"), f"{where}.method", tuple(QUANTIZERS))
        bits = d.pop("bits", 4)
        if type(bits) is not int or bits != 4:
            raise recipe_error(f"{where}.bits", f"{bits!r} bits is not supported", "use bits: 4")
        group = d.pop("group_size", 128)
        if isinstance(group, bool) or group not in GROUP_SIZES:
            raise recipe_error(
                f"{where}.group_size",
                f"INT4 group size {group!r} is not supported",
                f"use one of {list(GROUP_SIZES)} (ONNX Runtime's MatMulNBits / QMoE block sizes)",
            )
        symmetric = as_bool(d.pop("symmetric", True), f"{where}.symmetric")
        targets = d.pop("targets", list(TARGETS))
        if not isinstance(targets, (list, tuple)) or not targets:
            raise recipe_error(
                f"{where}.targets", f"{targets!r} is not a non-empty list", f"e.g. {list(TARGETS)}"
            )
        for t in targets:
            as_choice(t, f"{where}.targets", ALL_TARGETS)
        samples = as_int(d.pop("samples", 128), f"{where}.samples", lo=0)
        cls_ = QUANTIZERS[method]
        own = {f.name for f in dataclasses.fields(cls_)} - {"group_size", "symmetric"}
        unknown = sorted(set(d) - own)
        if unknown:
            raise recipe_error(
                where,
                f"unknown field(s) {unknown} for method {method}",
                f"use only {sorted([*COMMON, *own])}",
            )
        out = cls(method, bits, group, symmetric, tuple(dict.fromkeys(targets)), samples, d)
        q = out.quantizer()  # the method's own checks
        if q.needs_samples and samples < 1:
            raise recipe_error(f"{where}.samples", f"{method} needs calibration rows", "give samples >= 16")
        return out

    def quantizer(self) -> Quantizer:
        return make_quantizer(
            self.method, group_size=self.group_size, symmetric=self.symmetric, **self.options
        )

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in COMMON}
        d["targets"] = list(self.targets)
        return {**d, **self.options}


def layer_targets(layer: Any, targets: tuple[str, ...] | list[str]) -> list[tuple[str, Any, str]]:
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


class QuantizeStage(Stage):
    name = "quantize"
    settings_type = QuantizeSettings
    settings: QuantizeSettings

    def __init__(self, settings: QuantizeSettings, model: ModelFacts) -> None:
        super().__init__(settings, model)
        self.quantizer = settings.quantizer()
        q = self.quantizer
        self.want = Want(hessian=q.needs_hessian, samples=settings.samples)
        self.needs_inputs = q.needs_hessian or q.needs_samples or settings.samples > 0
        self.in_features: dict[str, int] = {}  # canonical name -> K, for every quantized weight
        self.bytes = 0
        self.fallback = 0
        self.errors: dict[str, list[float]] = {}
        self.head_method: str | None = None

    def quantize_head(self, name: str, weight: torch.Tensor) -> tuple[Packed, torch.Tensor]:
        """The lm_head `weight` [vocab, hidden] as INT4: (packed, dequantized weight). Its quantizer is the
        stage's when that needs no calibration inputs, else RTN with the same group and symmetry."""
        q = self.quantizer
        if q.needs_hessian or q.needs_samples:
            q = make_quantizer("rtn", group_size=self.settings.group_size, symmetric=self.settings.symmetric)
            self.head_method = "rtn"
        else:
            self.head_method = self.settings.method
        packed = q.quantize(weight.detach(), None)
        kept = self._keep(name, packed)
        return kept, packed.dequantize().to(device=weight.device, dtype=weight.dtype)

    def _keep(self, name: str, packed: Packed) -> Packed:
        """`packed` on the CPU (what the writer stores), counted in the config's modules and the bytes."""
        kept = Packed(
            packed.qweight.cpu(),
            packed.scales.cpu(),
            None if packed.zero_points is None else packed.zero_points.cpu(),
            packed.k,
            packed.fallback,
        )
        self.in_features[name] = packed.k
        self.bytes += sum(t.numel() * t.element_size() for t in kept.tensors(name).values())
        return kept

    def check_calibration(self, tokens: int, widths: dict[str, int]) -> None:
        """Before the long work: GPTQ needs as many calibration tokens as a Linear has inputs."""
        q = self.quantizer
        if not q.needs_hessian or "attention" not in self.settings.targets:
            return
        need = int(getattr(q, "min_rows", None) or max(widths.values()))
        if tokens < need:
            raise OmniedgeError(
                f"calibration too small for GPTQ: {tokens} calibration tokens reach each attention projection, "
                f"GPTQ needs at least {need} (the widest input, {max(widths.values())})",
                "raise calibration.samples or max_tokens, or quantize with rtn or awq",
            )

    def apply(self, work: LayerWork) -> None:
        report: dict[str, Any] = {}
        if "attention" in self.settings.targets:
            self._attention(work, report)
        if "experts" in self.settings.targets and work.is_moe:
            self._experts(work, report)
        work.report["quantize"] = report

    def _stats(self, work: LayerWork, key: str) -> InputStats | None:
        return work.inputs.linear(key, self.want) if (self.needs_inputs and work.inputs) else None

    def _attention(self, work: LayerWork, report: dict[str, Any]) -> None:
        q, layer = self.quantizer, work.layer
        attn = layer.self_attn
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        st, st_o = self._stats(work, "qkv"), self._stats(work, "o_proj")
        if st is not None and st_o is not None:
            s = q.input_scale([p.weight for p in projs], st)
            if s is not None:
                fold_into_layer(layer, "attn_in", s)
                st = st.scaled(s)
            cfg = attn.config
            tie = tie_kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)
            s_o = q.input_scale([attn.o_proj.weight], st_o, tie=tie)
            if s_o is not None:
                fold_into_layer(layer, "attn_out", s_o)
                st_o = st_o.scaled(s_o)
        packs = q.quantize_together([p.weight.detach() for p in projs], st)
        for proj, packed in zip(("q_proj", "k_proj", "v_proj"), packs, strict=True):
            self._done(work, f"self_attn.{proj}.weight", getattr(attn, proj), "weight", packed, st, report)
        self._done(
            work,
            "self_attn.o_proj.weight",
            attn.o_proj,
            "weight",
            q.quantize(attn.o_proj.weight.detach(), st_o),
            st_o,
            report,
        )

    def _experts(self, work: LayerWork, report: dict[str, Any]) -> None:
        q, layer = self.quantizer, work.layer
        block = layer.mlp
        st_in = st_mid = None
        if self.needs_inputs and work.inputs is not None:
            st_in, st_mid = work.inputs.experts(block, work.top_k, work.normalise, self.want)
            s = q.input_scale([block.experts.gate_up_proj], st_in)  # one scale for all experts (shared norm)
            if s is not None:
                fold_into_layer(layer, "moe_in", s)
                st_in = st_in.scaled(s)
            s_mid = q.input_scale([block.experts.down_proj], st_mid, per_expert=True)
            if s_mid is not None:
                fold_into_layer(layer, "expert_mid", s_mid)
                st_mid = st_mid.scaled(s_mid)
        experts = block.experts
        for pname, st in (("gate_up_proj", st_in), ("down_proj", st_mid)):
            packed = q.quantize(getattr(experts, pname).detach(), st)
            self._done(work, f"mlp.experts.{pname}", experts, pname, packed, st, report)

    def _done(
        self,
        work: LayerWork,
        local: str,
        owner: Any,
        pname: str,
        packed: Packed,
        stats: InputStats | None,
        report: dict[str, Any],
    ) -> None:
        """Record one quantized weight and make the layer compute with its dequantized values."""
        p = getattr(owner, pname)
        w_hat = packed.dequantize().to(device=p.device)
        entry: dict[str, Any] = {"fallback_experts": packed.fallback} if p.dim() == 3 else {}
        if stats is not None and stats.samples is not None:
            sampled = InputStats(stats.rows, stats.abs_sum, None, stats.samples)
            err = relative_output_error(p.detach(), w_hat, sampled)
            entry["error"] = round(err, 8)
            self.errors.setdefault(local.split(".")[-2] if p.dim() == 2 else local.split(".")[-1], []).append(
                err
            )
        with torch.no_grad():
            p.copy_(w_hat.to(p.dtype))
        name = work.prefix + local
        work.packed[name] = self._keep(name, packed)
        self.fallback += packed.fallback
        report[local] = entry

    def config(self, file: str) -> dict[str, Any]:
        """The `omniedge_quantization` entry of config.json (docs/artifacts.md §1)."""
        s = self.settings
        return {
            "method": s.method,
            "options": dict(s.options),
            "bits": int4.BITS,
            "group_size": int(s.group_size),
            "symmetric": bool(s.symmetric),
            "zero_point": int4.ZERO_POINT if s.symmetric else None,
            "file": file,
            "modules": sorted(self.in_features),
            "in_features": dict(sorted(self.in_features.items())),
        }

    def result(self) -> dict[str, Any]:
        return {
            "modules": len(self.in_features),
            **({"lm_head_method": self.head_method} if self.head_method else {}),
            "int4_bytes": self.bytes,
            "fallback_experts": self.fallback,
            "mean_error": {k: round(sum(v) / len(v), 8) for k, v in sorted(self.errors.items())},
        }
