"""The vision and audio encoders as transformers modules, built from the config and loaded from the checkpoint's
tensors alone (weights.SafetensorsDir): no thinker text model is built, so exporting a 30B checkpoint's
encoders costs their own 1.2 B parameters, not the model's 35 B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniedge.errors import OmniedgeError
from omniedge.weights import TensorSource, iter_prefixed

VISION_PREFIX = "thinker.visual."
AUDIO_PREFIX = "thinker.audio_tower."


def _build(cls: Any, config: Any, source: TensorSource, prefix: str, what: str) -> nn.Module:
    module = cls._from_config(config, dtype=torch.float32).eval()
    state = {
        k: v.float() for k, v in iter_prefixed(source, prefix) if not k.endswith((".qweight", ".scales"))
    }
    if not state:
        raise OmniedgeError(
            f"the checkpoint has no {what} weights ({prefix}*)", "export a full Qwen3-Omni thinker"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    names = set(source.names())
    persistent = set(module.state_dict())
    # a quantized weight has no float copy in the checkpoint: its packed INT4 goes into the graph instead
    missing = [m for m in missing if m in persistent and f"{prefix}{m}.qweight" not in names]
    if missing or unexpected:
        raise OmniedgeError(
            f"the {what} weights do not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}",
            "the checkpoint's config.json and weights disagree: re-create the checkpoint",
        )
    return module


def load_encoders(source: TensorSource, config: Any) -> tuple[nn.Module, nn.Module]:
    """(vision encoder, audio encoder) in float32, from a Qwen3OmniMoeConfig and the checkpoint's tensors."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

    tc = config.thinker_config
    visual = _build(m.Qwen3OmniMoeVisionEncoder, tc.vision_config, source, VISION_PREFIX, "vision encoder")
    audio = _build(m.Qwen3OmniMoeAudioEncoder, tc.audio_config, source, AUDIO_PREFIX, "audio encoder")
    return visual, audio


def param_shapes(module: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name -> shape, what the INT4 store checks packed tensors against."""
    return {prefix + n: tuple(p.shape) for n, p in module.named_parameters()}


def module_names(module: nn.Module, prefix: str) -> dict[int, str]:
    """id(submodule) -> canonical name under `prefix`, for the graph wrappers' INT4 look-ups."""
    return {id(m): prefix + n for n, m in module.named_modules() if n}


def read_config(checkpoint: Path) -> Any:
    from transformers import Qwen3OmniMoeConfig

    try:
        return Qwen3OmniMoeConfig.from_pretrained(str(checkpoint))
    except Exception as e:  # transformers raises several types for a bad config
        raise OmniedgeError(
            f"{checkpoint}/config.json is not a Qwen3-Omni config ({e})", "re-create the checkpoint"
        ) from e
