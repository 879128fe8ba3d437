"""Calibration requests: where they come from (pluggable sources) and how they become thinker inputs.

A source makes requests of one modality (text, image or audio) for one split: `calibration` (what the
teacher's activations and router statistics are computed on) or `heldout` (never calibrated on, used only
to measure quality after each stage). Sources: `builtin` (made in code, for tiny models and tests),
`omni-mini-data` (the omni-mini training set), `pack` (a portable calibration pack of real text, photos
and speech, omniedge.compress.calibration_pack: what real models use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omniedge.errors import OmniedgeError
from omniedge.models.family import REQUEST_KINDS, SPECIAL_TOKENS, thinker_parts

TEXT, IMAGE, AUDIO = 0, 1, 2
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Request:
    """One user turn (text, optional image HxWx3 uint8, optional 16 kHz mono float32 audio) and a reply."""

    prompt: str
    reply: str = ""
    image: np.ndarray | None = None
    audio: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """One of REQUEST_KINDS: what the request carries besides text."""
        parts = [m for m, x in (("image", self.image), ("audio", self.audio)) if x is not None]
        return "+".join(parts) or "text"


# A source makes `n` requests of one kind (REQUEST_KINDS: "text", "image", "audio", "image+audio") of one split
# ("calibration" or "heldout") from the calibration settings: source(kind, n, settings, rng, split). A source
# without requests of a kind raises an OmniedgeError that says so.
Source = Callable[[str, int, dict[str, Any], np.random.Generator, str], list[Request]]
SPLITS = ("calibration", "heldout")
_SOURCES: dict[str, Source] = {}


def register_source(name: str, fn: Source) -> None:
    """Make a request source selectable as `calibration.source: <name>` in a recipe."""
    _SOURCES[name] = fn


def get_source(name: str) -> Source:
    # The modules that register the shipped sources.
    from omniedge.compress import calibration_builtin, calibration_data, calibration_pack  # noqa: F401

    if name not in _SOURCES:
        raise OmniedgeError(
            f"unknown calibration source {name!r}", f"use one of {sorted(_SOURCES)} in calibration.source"
        )
    return _SOURCES[name]


def modality_counts(samples: int, mix: dict[str, float]) -> dict[str, int]:
    """Split `samples` over request kinds (REQUEST_KINDS) by the recipe's mix (largest remainder, every
    share > 0 gets >= 1)."""
    total = sum(mix.values())
    want = {m: samples * mix.get(m, 0.0) / total for m in REQUEST_KINDS}
    counts = {m: int(want[m]) for m in REQUEST_KINDS}
    for m in sorted(REQUEST_KINDS, key=lambda m: want[m] - counts[m], reverse=True):
        if sum(counts.values()) >= samples:
            break
        counts[m] += 1
    for m in REQUEST_KINDS:
        if mix.get(m, 0.0) > 0 and counts[m] == 0:
            counts[m] = 1
    return counts


# ---------------------------------------------------------------- preprocessing
# The runtime's numpy preprocessing (parity-tested against transformers), so calibration sees exactly the
# features the device will compute.


def audio_features(audio: np.ndarray, n_mels: int, n_window: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_features [1, n_mels, T], feature_attention_mask [1, T], number of <|audio_pad|> tokens)."""
    from omniedge.runtime.preprocess import log_mel, num_audio_tokens

    mel = log_mel(np.asarray(audio, dtype=np.float32), n_mels=n_mels)
    frames = mel.shape[1]
    mask = torch.ones(1, frames, dtype=torch.long)
    return torch.from_numpy(mel)[None], mask, num_audio_tokens(frames, n_window)


def image_features(
    image: np.ndarray, patch: int, temporal: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw [1, 3]) of an HxWx3 uint8 image resized to the nearest multiple of
    patch*merge (bicubic; a no-op for the built-in images, which are drawn at that size)."""
    from omniedge.runtime.preprocess import image_inputs

    unit = patch * merge
    h, w = image.shape[:2]
    size = (max(unit, round(h / unit) * unit), max(unit, round(w / unit) * unit))
    pixels, grid = image_inputs(image, size, patch, temporal, merge)
    return torch.from_numpy(pixels), torch.tensor([list(grid)])


# ---------------------------------------------------------------- encoding in the chat format


@dataclass
class Encoded:
    """Thinker forward kwargs for one request and the modality of every token position."""

    inputs: dict[str, torch.Tensor]
    modality: torch.Tensor  # [seq] int64, TEXT / IMAGE / AUDIO
    kind: str


def _special_ids(tokenizer: Any, cfg: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for name, text in SPECIAL_TOKENS.items():
        i = tokenizer.token_to_id(text)
        if i is None:
            raise OmniedgeError(
                f"the tokenizer has no {text} token", "use the checkpoint's own tokenizer.json"
            )
        ids[name] = i
    for name, attr in (("image_pad", "image_token_id"), ("audio_pad", "audio_token_id")):
        if getattr(cfg, attr, ids[name]) != ids[name]:
            raise OmniedgeError(
                f"tokenizer.json and config.json disagree on {SPECIAL_TOKENS[name]} "
                f"({ids[name]} vs {getattr(cfg, attr)})",
                "use the tokenizer that belongs to this checkpoint",
            )
    return ids


def encode_request(req: Request, tokenizer: Any, model: Any, max_tokens: int) -> Encoded:
    """Qwen3-Omni chat format: <|im_start|>user\\n[image][audio]text<|im_end|>\\n<|im_start|>assistant\\nreply."""
    tcfg = thinker_parts(model).thinker.config
    sp = _special_ids(tokenizer, tcfg)
    ids: list[int] = []
    mod: list[int] = []
    inputs: dict[str, torch.Tensor] = {}

    def text(s: str) -> None:
        t = tokenizer.encode(s, add_special_tokens=False).ids
        ids.extend(t)
        mod.extend([TEXT] * len(t))

    def special(name: str, n: int = 1, modality: int = TEXT) -> None:
        ids.extend([sp[name]] * n)
        mod.extend([modality] * n)

    special("im_start")
    text("user\n")
    if req.image is not None:
        v = tcfg.vision_config
        pixels, grid = image_features(req.image, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        inputs.update(pixel_values=pixels, image_grid_thw=grid)
        special("vision_start")
        special("image_pad", int(grid.prod()) // v.spatial_merge_size**2, IMAGE)
        special("vision_end")
    if req.audio is not None:
        a = tcfg.audio_config
        feats, mask, n_audio = audio_features(req.audio, a.num_mel_bins, a.n_window)
        inputs.update(input_features=feats, feature_attention_mask=mask)
        special("audio_start")
        special("audio_pad", n_audio, AUDIO)
        special("audio_end")
    text(req.prompt)
    special("im_end")
    text("\n")
    special("im_start")
    text("assistant\n")
    if req.reply:
        text(req.reply)
        special("im_end")
    # Truncate at the token budget, but never inside an image or audio span (its features must all fit).
    last_media = max((i for i, m in enumerate(mod) if m != TEXT), default=-1)
    keep = max(max_tokens, last_media + 2)
    ids, mod = ids[:keep], mod[:keep]
    input_ids = torch.tensor([ids])
    inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return Encoded(inputs, torch.tensor(mod), req.kind)


def build_requests(settings: dict[str, Any], counts: dict[str, int], split: str) -> list[Request]:
    """`counts[kind]` requests of each kind (REQUEST_KINDS) from the recipe's source, deterministic for its
    seed."""
    rng = np.random.default_rng([settings["seed"], SPLITS.index(split)])
    source = get_source(settings["source"])
    out: list[Request] = []
    for kind in REQUEST_KINDS:
        n = counts.get(kind, 0)
        if n:
            got = source(kind, n, settings, rng, split)
            if not got:
                raise OmniedgeError(
                    f"calibration source {settings['source']!r} has no {kind} requests ({split} split), "
                    f"but the recipe asks for {n}",
                    f"give the source {kind} data, or set the recipe's {kind} share/count to 0",
                )
            out.extend(got)
    return out
