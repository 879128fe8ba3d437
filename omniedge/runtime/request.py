"""A request's preprocessing: text, an image and audio in, the model inputs in numpy out (no engine runs).

`Omni.preprocess` is this with the loaded bundle's manifest, tokenizer and mel filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.runtime.manifest import Manifest
from omniedge.runtime.media import AudioInput, ImageInput, load_audio, load_image
from omniedge.runtime.preprocess import AudioChunks, audio_chunks, image_inputs, log_mel
from omniedge.runtime.prompt import Prompt, build_prompt


@dataclass
class Request:
    """A request after preprocessing, before any engine ran: what the encoders and thinker are fed."""

    prompt: Prompt
    pixel_values: np.ndarray | None = None  # float32 [num_patches, 3*T*P*P]
    image_grid_thw: tuple[int, int, int] | None = None
    mel: np.ndarray | None = None  # float32 [n_mels, frames]
    chunks: AudioChunks | None = None
    warnings: list[str] = field(default_factory=list)  # what was used although suspect (truncated WAV)


def preprocess(
    m: Manifest,
    tokenizer: Any,
    mel_filters: np.ndarray | None,
    prompt: str,
    image: ImageInput | None = None,
    audio: AudioInput | None = None,
    system: str | None = None,
) -> Request:
    """Decode media and build model inputs in numpy (no engine runs here)."""
    req_pixels = grid = mel = chunks = None
    n_img = n_aud = 0
    notes: list[str] = []
    if image is not None:
        if m.image is None:
            raise OmniedgeError(f"bundle {m.root} has no vision engine", "export it with the vision encoder")
        s = m.image
        rgb = load_image(image)
        if min(rgb.shape[:2]) < s.patch_size:  # less than one patch: nothing the model could see
            raise OmniedgeError(
                f"the image is {rgb.shape[1]}x{rgb.shape[0]} pixels; the model needs at least one "
                f"{s.patch_size}x{s.patch_size} patch",
                "send a real picture",
            )
        req_pixels, grid = image_inputs(
            rgb, s.size, s.patch_size, s.temporal_patch_size, s.merge_size, s.mean, s.std
        )
        n_img = s.num_tokens
    if audio is not None:
        if m.audio is None:
            raise OmniedgeError(f"bundle {m.root} has no audio engine", "export it with the audio encoder")
        a = m.audio
        wav = load_audio(audio, a.sampling_rate, a.max_seconds, min_samples=a.n_fft, notes=notes)
        mel = log_mel(wav, a.n_mels, a.n_fft, a.hop_length, a.sampling_rate, mel_filters)
        chunks = audio_chunks(mel, a.n_window, a.n_window_infer)
        n_aud = chunks.num_tokens
    p = build_prompt(tokenizer, m.special_tokens, prompt, system, n_img, n_aud)
    return Request(p, req_pixels, grid, mel, chunks, notes)
