"""INT4 quantizers behind one interface (base.Quantizer): RTN (optionally with clip search), GPTQ, AWQ.

`make_quantizer(method, **settings)` is the registry lookup a recipe stage uses; a new method plugs in
with `register_quantizer` without touching the pipeline. All write omniedge.int4's packed layout.
"""

from __future__ import annotations

from typing import Any

from omniedge.compress.quantizers.awq import AWQ
from omniedge.compress.quantizers.base import (
    GROUP_SIZES,
    Packed,
    Quantizer,
    check_group_size,
    convert_for_runtime,
    create_quantized_state_dict,
    refuse_quantized,
    relative_output_error,
)
from omniedge.compress.quantizers.gptq import GPTQ
from omniedge.compress.quantizers.grid import RTN
from omniedge.compress.quantizers.observer import InputObserver, InputStats
from omniedge.errors import OmniedgeError

QUANTIZERS: dict[str, type[Quantizer]] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ}


def register_quantizer(name: str, cls: type[Quantizer]) -> None:
    QUANTIZERS[name] = cls


def make_quantizer(method: str, **settings: Any) -> Quantizer:
    """The quantizer `method` with its settings (group_size, symmetric, method-specific fields)."""
    if method not in QUANTIZERS:
        raise OmniedgeError(f"unknown quantization method {method!r}", f"use one of {sorted(QUANTIZERS)}")
    try:
        return QUANTIZERS[method](**settings)
    except (TypeError, ValueError) as e:
        raise OmniedgeError(f"quantize method {method}: {e}", "check the stage's settings") from e


__all__ = [
    "AWQ",
    "GPTQ",
    "GROUP_SIZES",
    "QUANTIZERS",
    "RTN",
    "InputObserver",
    "InputStats",
    "Packed",
    "Quantizer",
    "check_group_size",
    "convert_for_runtime",
    "create_quantized_state_dict",
    "make_quantizer",
    "refuse_quantized",
    "register_quantizer",
    "relative_output_error",
]
