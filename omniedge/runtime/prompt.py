"""Qwen3-Omni's chat format as token ids, with the media placeholders already expanded.

Rendered like the model's chat template (ChatML; media parts of the user turn in the order given,
with no separator between parts):

    <|im_start|>system\\n{system}<|im_end|>\\n            (only when a system text is given)
    <|im_start|>user\\n<|vision_start|><|image_pad|>*N<|vision_end|><|audio_start|><|audio_pad|>*M<|audio_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n

We put the image first, then the audio, then the text: the order of Qwen's own examples. The string
is tokenized once with a single pad per medium, then each pad is repeated: special tokens are atomic
in the tokenizer, so this equals tokenizing the expanded string, as transformers' processor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.models.family import SPECIAL_TOKENS

# Token texts of the chat format: one table for the whole project (family.py imports no torch).
TOKEN_TEXT = SPECIAL_TOKENS


@dataclass
class Prompt:
    ids: np.ndarray  # int64 [seq]
    text: str  # the rendered template, one pad per medium
    num_image_tokens: int
    num_audio_tokens: int


def render(text: str, system: str | None = None, image: bool = False, audio: bool = False) -> str:
    """The chat template as a string, with one placeholder token per medium."""
    t = TOKEN_TEXT
    parts = []
    if system:
        parts.append(f"{t['im_start']}system\n{system}{t['im_end']}\n")
    media = ""
    if image:
        media += t["vision_start"] + t["image_pad"] + t["vision_end"]
    if audio:
        media += t["audio_start"] + t["audio_pad"] + t["audio_end"]
    parts.append(f"{t['im_start']}user\n{media}{text}{t['im_end']}\n")
    parts.append(f"{t['im_start']}assistant\n")
    return "".join(parts)


def _reject_control_tokens(text: str, what: str) -> None:
    for tok in TOKEN_TEXT.values():
        if tok in text:
            raise OmniedgeError(
                f"the {what} contains the control token {tok}, which would break the chat format",
                "remove it from the text; pass images and audio through image= and audio=",
            )


def build_prompt(
    tokenizer: Any,
    special_tokens: dict[str, int],
    text: str,
    system: str | None = None,
    num_image_tokens: int = 0,
    num_audio_tokens: int = 0,
) -> Prompt:
    """Token ids of one user turn plus the assistant header, media pads expanded to their counts."""
    if not isinstance(text, str):
        raise OmniedgeError(f"prompt must be a string, got {type(text).__name__}", "pass the user's text")
    _reject_control_tokens(text, "prompt")
    if system:
        _reject_control_tokens(system, "system text")
    rendered = render(text, system, image=num_image_tokens > 0, audio=num_audio_tokens > 0)
    ids = list(tokenizer.encode(rendered, add_special_tokens=False).ids)
    for name in ("im_start", "im_end"):
        if special_tokens[name] not in ids:
            raise OmniedgeError(
                f"the bundle's tokenizer does not map {TOKEN_TEXT[name]} to id {special_tokens[name]}",
                "the tokenizer and manifest come from different exports: re-export the bundle",
            )
    expand: dict[int, int] = {}
    for name, n in (("image_pad", num_image_tokens), ("audio_pad", num_audio_tokens)):
        if n > 0:
            pad = special_tokens[name]
            if ids.count(pad) != 1:
                raise OmniedgeError(
                    f"the bundle's tokenizer does not map {TOKEN_TEXT[name]} to id {pad}",
                    "the tokenizer and manifest come from different exports: re-export the bundle",
                )
            expand[pad] = n
    out: list[int] = []
    for i in ids:
        out.extend([i] * expand.get(i, 1))
    return Prompt(np.asarray(out, dtype=np.int64), rendered, num_image_tokens, num_audio_tokens)
