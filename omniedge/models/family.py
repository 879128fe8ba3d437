"""Where things live inside a transformers Qwen3-Omni model, whatever the transformers 5.x release.

Module paths move between releases (5.17: `thinker.audio_tower`, `thinker.model` is the text model;
5.24: `thinker.model.audio_tower`, `thinker.model.language_model`), so every stage asks here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Special tokens of Qwen3-Omni's chat format, by name in the tokenizer.
SPECIAL_TOKENS: dict[str, str] = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "audio_start": "<|audio_start|>",
    "audio_end": "<|audio_end|>",
    "audio_pad": "<|audio_pad|>",
}
# Role words are ordinary single tokens in Qwen's vocabulary (user 872, assistant 77091, system 8948).
ROLE_TOKENS = ("system", "user", "assistant")
# What the thinker reads, in the row order of every per-modality tensor (calibration statistics, saliency, eval).
MODALITIES = ("text", "image", "audio")
REQUEST_KINDS = (*MODALITIES, "image+audio")  # what a request carries besides text (Request.kind)


@dataclass
class ThinkerParts:
    thinker: Any
    text_model: Any  # decoder stack: embed_tokens, layers, norm, rotary_emb
    audio_tower: Any
    visual: Any
    lm_head: Any


def thinker_of(model: Any) -> Any:
    """The thinker, from a full Qwen3OmniMoeForConditionalGeneration or a bare thinker."""
    return getattr(model, "thinker", model)


def thinker_parts(model: Any) -> ThinkerParts:
    thinker = thinker_of(model)
    inner = thinker.model
    if hasattr(inner, "language_model"):  # transformers >= 5.2x layout
        text, audio, visual = inner.language_model, inner.audio_tower, inner.visual
    else:  # transformers 5.17 layout
        text, audio, visual = inner, getattr(thinker, "audio_tower", None), getattr(thinker, "visual", None)
    return ThinkerParts(
        thinker=thinker, text_model=text, audio_tower=audio, visual=visual, lm_head=thinker.lm_head
    )


def moe_blocks(model: Any) -> list[tuple[int, Any]]:
    """(layer index, sparse MoE block) for every thinker decoder layer that has experts."""
    text = thinker_parts(model).text_model
    return [(i, layer.mlp) for i, layer in enumerate(text.layers) if hasattr(layer.mlp, "experts")]
