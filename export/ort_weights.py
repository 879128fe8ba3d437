"""The checkpoint's tensors as the ONNX Runtime thinker graph takes them (export/thinker_ort.py).

Float tensors are cast to the graph dtype; packed INT4 stays packed (omniedge/int4.py's layout, which is
MatMulNBits' B / scales / zero_points), with the checks that it fits the weight's K and the group; fused
experts are reshaped for QMoE (`qmoe_weight`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.weights import TensorSource


class Weights:
    """The checkpoint's tensors as numpy: float (cast to the graph dtype) or packed INT4 (kept packed)."""

    def __init__(self, source: TensorSource, config: dict[str, Any], dtype: Any) -> None:
        self.source = source
        self.names = set(source.names())
        self.dtype = dtype
        q = config.get("omniedge_quantization") or {}
        self.group = int(q.get("group_size", 128)) if q else 128
        self.symmetric = bool(q.get("symmetric", True))
        if q and (int(q.get("bits", 4)) != 4 or (self.symmetric and int(q.get("zero_point", 8)) != 8)):
            raise OmniedgeError(
                f"the checkpoint's quantization ({q.get('bits')} bits, zero point {q.get('zero_point')}) is not "
                "INT4 with zero point 8 or per-group zero points",
                "re-run `omniedge compress` with the INT4 quantize stage",
            )

    def has(self, name: str) -> bool:
        return name in self.names

    def float(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise OmniedgeError(
                f"the checkpoint has no tensor {name}", "pass a complete Qwen3-Omni checkpoint"
            )
        return self.source.get(name).float().numpy().astype(self.dtype)

    def packed(self, name: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(qweight uint8 [..., N, nb, group/2], scales [..., N, nb] graph dtype, packed zero points uint8
        [..., N, ceil(nb/2)] or None for the implicit 8), or None if not quantized."""
        if f"{name}.qweight" not in self.names:
            return None
        qw = self.source.get(f"{name}.qweight").numpy()
        sc = self.source.get(f"{name}.scales").float().numpy().astype(self.dtype)
        nb = math.ceil(k / self.group)
        zp = None
        if not self.symmetric:
            if f"{name}.zero_points" not in self.names:
                raise OmniedgeError(
                    f"{name} is asymmetric INT4 without zero points", "re-run `omniedge compress`"
                )
            zp = self.source.get(f"{name}.zero_points").numpy()
        if (
            qw.dtype != np.uint8
            or qw.shape[-2:] != (nb, self.group // 2)
            or sc.shape != qw.shape[:-1]
            or (zp is not None and (zp.dtype != np.uint8 or zp.shape != (*sc.shape[:-1], -(-nb // 2))))
        ):
            raise OmniedgeError(
                f"{name}: packed INT4 of shape {qw.shape} / scales {sc.shape} does not fit K={k}, "
                f"group {self.group}",
                "re-run `omniedge compress`",
            )
        return qw, sc, zp


def qmoe_weight(qw: np.ndarray, sc: np.ndarray, k: int, group: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Packed [E, N, nb, g/2] + scales [E, N, nb] -> QMoE's [E, N, K/2] + scales: blocked [E, N, K/g] when K is a
    multiple of the group, else (K <= group: one block per row) per-channel [E, N] with the padding cut off."""
    e, n = qw.shape[:2]
    if k % group == 0:
        return (
            np.ascontiguousarray(qw.reshape(e, n, k // 2)),
            np.ascontiguousarray(sc.reshape(e, n, -1)),
            True,
        )
    if k < group and k % 2 == 0:
        return (
            np.ascontiguousarray(qw.reshape(e, n, -1)[..., : k // 2]),
            np.ascontiguousarray(sc.reshape(e, n)),
            False,
        )
    raise OmniedgeError(
        f"QMoE cannot take experts of input width {k} with group {group} (not a multiple, and wider than a group)",
        "quantize with a group that divides the expert widths, or export --flavour portable",
    )
