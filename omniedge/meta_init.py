"""Models built on the meta device (no weight memory) and filled one parameter at a time.

Every stage that meets the full-size model uses this: the random source (names and shapes only), the
layer-by-layer compressor (one decoder layer materialised at a time) and the INT4 checkpoint loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` (buffers included), as from_pretrained(dtype=...) does."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> Any:
    """Qwen3OmniMoeForConditionalGeneration of `config` (a config object or config.json dict): parameters
    on the meta device, buffers real (on the CPU), in `dtype`."""
    from accelerate import init_empty_weights
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    if isinstance(config, dict):
        config = Qwen3OmniMoeConfig(**{k: v for k, v in config.items() if k != "architectures"})
    with default_dtype(dtype), init_empty_weights():
        return Qwen3OmniMoeForConditionalGeneration(config)


def set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` (dotted, inside `module`) with `value`, frozen."""
    owner_name, _, pname = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[pname] = nn.Parameter(value, requires_grad=False)
