"""INT4 weights stay INT4 inside the exported graphs.

A quantized checkpoint (docs/artifacts.md §1) carries `int4.safetensors` in ONNX Runtime's MatMulNBits
layout. Linear layers become `com.microsoft.MatMulNBits` (a torch custom op whose ONNX translation is
that contrib op; no zero_points input means zero point 8, checked against onnxruntime in the tests);
fused MoE experts gather only the top-k experts' packed bytes and scales and unpack them with standard
ONNX ops (Gather, Cast, Floor, Mul, Sub), which every onnxruntime >= 1.20 runs: the graph holds
no float copy of any quantized weight.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniedge.errors import OmniedgeError
from omniedge.weights import canonical_name

BITS = 4
BLOCK = 128
ZERO_POINT = 8
CONFIG_KEY = "omniedge_quantization"
_REQUANTIZE = "re-run `omniedge compress` to rewrite the checkpoint"


# ---------------------------------------------------------------- the quantized tensors


@dataclass(frozen=True)
class PackedWeight:
    """One quantized parameter: qweight uint8 [..., N, nb, 64], scales float32 [..., N, nb], K."""

    qweight: torch.Tensor
    scales: torch.Tensor
    k: int

    @property
    def n(self) -> int:
        return int(self.qweight.shape[-3])


class Int4Store:
    """The packed INT4 tensors of a checkpoint, looked up by (any spelling of) parameter name."""

    def __init__(self, packed: dict[str, PackedWeight], source: str) -> None:
        self.packed = packed
        self.source = source
        self.used: set[str] = set()

    def __len__(self) -> int:
        return len(self.packed)

    def get(self, name: str) -> PackedWeight | None:
        key = canonical_name(name)
        hit = self.packed.get(key)
        if hit is not None:
            self.used.add(key)
        return hit

    def unused(self) -> list[str]:
        return sorted(set(self.packed) - self.used)


def check_portable(q: Mapping[str, Any], checkpoint: Path) -> None:
    """The portable (standard-ops) graphs unpack INT4 as symmetric, group 128: refuse anything else."""
    if not q:
        return
    symmetric = q.get("symmetric", True) and q.get("zero_point", ZERO_POINT) == ZERO_POINT
    if (q.get("bits"), q.get("group_size")) != (BITS, BLOCK) or not symmetric:
        raise OmniedgeError(
            f"{checkpoint} is INT4 with group {q.get('group_size')}"
            + ("" if symmetric else " and per-group zero points")
            + f"; the portable (TensorRT) export supports only symmetric INT4 with group {BLOCK}",
            "export with --flavour ort (MatMulNBits / QMoE take groups 32, 64, 128 and zero points), "
            f"or compress with quantize: {{group_size: {BLOCK}, symmetric: true}}",
        )


def load_int4(
    checkpoint: Path, shapes: Mapping[str, Sequence[int]], prefix: str | tuple[str, ...] = ""
) -> Int4Store | None:
    """The checkpoint's INT4 tensors under `prefix` (canonical names), checked against the float shapes
    their layers have (`shapes`: canonical parameter name -> [..., N, K]); None if not quantized."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    q = cfg.get(CONFIG_KEY)
    if not q:
        return None
    from omniedge.weights import SafetensorsDir

    source = SafetensorsDir(checkpoint)
    all_names = set(source.names())
    listed = q.get("modules") or sorted({k[: -len(".qweight")] for k in all_names if k.endswith(".qweight")})
    names = [n for n in (canonical_name(m) for m in listed) if n.startswith(prefix)]
    if names:  # these graphs unpack INT4 with standard ops: symmetric group 128 only
        check_portable(q, checkpoint)
    in_features = {canonical_name(k): v for k, v in (q.get("in_features") or {}).items()}
    packed: dict[str, PackedWeight] = {}
    for key in names:
        if f"{key}.qweight" not in all_names or f"{key}.scales" not in all_names:
            raise OmniedgeError(f"{checkpoint} lacks {key}.qweight or {key}.scales", _REQUANTIZE)
        qw, sc = source.get(f"{key}.qweight"), source.get(f"{key}.scales")
        shape = shapes.get(key)
        if shape is None:
            raise OmniedgeError(f"{checkpoint} quantizes {key}, which the model does not have", _REQUANTIZE)
        k = int(in_features.get(key) or shape[-1])  # the checkpoint's K (compress records it)
        nb = math.ceil(k / BLOCK)
        want_q = (*shape[:-1], nb, BLOCK // 2)
        if (
            qw.dtype != torch.uint8
            or tuple(qw.shape) != tuple(want_q)
            or tuple(sc.shape) != tuple(want_q[:-1])
        ):
            raise OmniedgeError(
                f"{key} has qweight {tuple(qw.shape)} {qw.dtype} / scales {tuple(sc.shape)}, "
                f"expected uint8 {tuple(want_q)} / {tuple(want_q[:-1])} for a weight of shape {tuple(shape)}",
                _REQUANTIZE,
            )
        packed[key] = PackedWeight(qw.contiguous(), sc.to(torch.float32).contiguous(), k)
    return Int4Store(packed, str(checkpoint))


def warn_unused(store: Int4Store | None) -> list[str]:
    """Quantized tensors no graph consumed as INT4 (exported as float, e.g. a conv): say so, return them."""
    if store is None:
        return []
    left = store.unused()
    if left:
        warnings.warn(
            f"{len(left)} INT4 tensors have no INT4 form in the graphs and were exported as float: "
            + ", ".join(left[:5])
            + (" ..." if len(left) > 5 else ""),
            stacklevel=2,
        )
    return left


# ---------------------------------------------------------------- MatMulNBits as a torch custom op


def _unpack(
    qweight: torch.Tensor, scales: torch.Tensor, k: int, anchor: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., N, nb, 64] uint8 + [..., N, nb] -> float32 [..., N, K]: (q - 8) * scale, low nibble first.

    Written with ops that export to plain ONNX, so the gathered-experts path is the same code in torch
    and in the graph. Nibbles are split in float (exact below 256): the exporter types a uint8 right
    shift as int8, and onnxruntime has no uint8 Div.

    `anchor` (a 1.0 computed from a graph input) keeps graph optimizers from constant-folding the
    dequantization of whole initializers into float copies of the weights."""
    qf = qweight.to(torch.float32)
    if anchor is not None:
        qf = qf * anchor
    hi = torch.floor(qf * (1.0 / 16.0))
    lo = qf - hi * 16.0
    q = torch.stack((lo, hi), dim=-1).flatten(-2) - float(ZERO_POINT)
    w = (q * scales.unsqueeze(-1)).flatten(-2)
    return w[..., :k]


@torch.library.custom_op("omniedge::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, k: int, n: int
) -> torch.Tensor:
    """x [..., K] @ dequant(B)^T -> [..., N]; B, scales in MatMulNBits layout (scales flat [N*nb])."""
    w = _unpack(qweight, scales.reshape(n, -1), k)
    return torch.matmul(x, w.transpose(0, 1))


@matmul_nbits.register_fake
def _matmul_nbits_fake(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, k: int, n: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _declare_contrib_schema() -> None:
    """onnxscript builds nodes from onnx schemas; ORT's contrib ops have none in onnx, so declare the one
    we emit (inputs, outputs, attributes as ORT defines them) before exporting."""
    import onnx.defs as D

    try:
        D.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except Exception:  # onnx raises SchemaError when missing
        pass
    fp = D.OpSchema.FormalParameter
    attr = D.OpSchema.Attribute
    D.register_schema(
        D.OpSchema(
            "MatMulNBits",
            "com.microsoft",
            1,
            doc="onnxruntime contrib op; declared so the exporter can emit it (ORT owns the real schema)",
            inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1")],
            outputs=[fp("Y", "T1")],
            type_constraints=[
                ("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
                ("T2", ["tensor(uint8)"], "packed 4-bit weights"),
            ],
            attributes=[
                attr("K", D.OpSchema.AttrType.INT, "input width"),
                attr("N", D.OpSchema.AttrType.INT, "output width"),
                attr("bits", D.OpSchema.AttrType.INT, "bits per weight"),
                attr("block_size", D.OpSchema.AttrType.INT, "weights per scale"),
            ],
        )
    )


def translation_table() -> dict[Any, Any]:
    """custom_translation_table for torch.onnx.export: our custom op -> com.microsoft.MatMulNBits."""
    import onnxscript

    _declare_contrib_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def onnx_matmul_nbits(x: Any, qweight: Any, scales: Any, k: int, n: int) -> Any:
        return msft.MatMulNBits(x, qweight, scales, K=k, N=n, bits=BITS, block_size=BLOCK)

    return {torch.ops.omniedge.matmul_nbits.default: onnx_matmul_nbits}


# ---------------------------------------------------------------- modules the graph wrappers use


class Int4Linear(nn.Module):
    """An nn.Linear whose weight lives as MatMulNBits B/scales buffers (no float copy)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        if packed.qweight.dim() != 3:
            raise ValueError("Int4Linear needs a 2-D weight")
        self.k, self.n = packed.k, packed.n
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales.reshape(-1))  # ORT >= 1.20 takes flat [N * nb]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.omniedge.matmul_nbits(x, self.qweight, self.scales, self.k, self.n)
        return y if self.bias is None else y + self.bias


class DenseLinear(nn.Module):
    """A float weight [N, K] (+ bias) applied as x @ W^T: for raw parameters (routers) and conv-as-matmul."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> canonical name, so wrappers can ask the INT4 store about any submodule they hold."""
    return {id(m): canonical_name(n) for n, m in model.named_modules() if n}


def linear(
    module_or_weight: nn.Module | torch.Tensor,
    name: str,
    store: Int4Store | None,
    bias: torch.Tensor | None = None,
) -> nn.Module:
    """The graph's version of a linear layer: INT4 when `name`.weight is quantized, else float.

    `module_or_weight` is an nn.Linear (reused as is when float) or a raw [N, K] weight tensor; `name` is
    the module's parameter prefix (`...q_proj`) or, for a raw tensor, the parameter's full name."""
    if isinstance(module_or_weight, nn.Linear):
        weight, bias, pname = module_or_weight.weight, module_or_weight.bias, f"{name}.weight"
    else:
        weight, pname = module_or_weight, name
    packed = store.get(pname) if store is not None else None
    if packed is not None:
        return Int4Linear(packed, bias)
    if isinstance(module_or_weight, nn.Linear):
        return module_or_weight
    return DenseLinear(weight, bias)


class ExpertBank(nn.Module):
    """Fused expert weights [E, N, K], float or INT4, of which a graph gathers only the chosen rows."""

    def __init__(self, weight: torch.Tensor, name: str, store: Int4Store | None) -> None:
        super().__init__()
        packed = store.get(name) if store is not None else None
        self.k = int(weight.shape[-1])
        self.int4 = packed is not None
        if packed is not None:
            self.register_buffer("qweight", packed.qweight)  # [E, N, nb, 64]
            self.register_buffer("scales", packed.scales)  # [E, N, nb]
        else:
            self.weight = weight  # the transformers parameter itself, shared, not copied

    def all(self, anchor: torch.Tensor) -> torch.Tensor:
        """float32 [E, N, K]: every expert, dequantized once per call (the prefill path). `anchor` is a
        1.0 derived from the input so no optimizer folds this into a resident float copy of all experts."""
        return _unpack(self.qweight, self.scales, self.k, anchor) if self.int4 else self.weight

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [S, N, K] weights of experts `ids` [S]; INT4 unpacks only those experts."""
        if self.int4:
            return _unpack(self.qweight[ids], self.scales[ids], self.k)
        return self.weight[ids]
