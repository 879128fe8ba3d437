"""Model inputs from decoded media, in numpy: Whisper log-mel + audio chunk metadata, Qwen2-VL patches.

These must reproduce transformers' WhisperFeatureExtractor, Qwen2VLImageProcessor and the chunking in
Qwen3-Omni's audio encoder number for number (tests check parity), because the exported graphs were
traced from those. The chunk metadata is what the audio graph takes instead of computing it itself
(docs/artifacts.md §2: padded_features, valid_indices, window_ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- audio: log-mel


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    step = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * step, 3.0 * f / 200.0)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    step = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(step * (m - 15.0)), 200.0 * m / 3.0)


def mel_filter_bank(
    n_mels: int = 128, n_fft: int = 400, sampling_rate: int = 16000, f_min: float = 0.0, f_max: float = 8000.0
) -> np.ndarray:
    """[n_fft//2+1, n_mels] triangular filters, Slaney scale and area normalisation (Whisper's bank)."""
    n_freq = n_fft // 2 + 1
    edges = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(f_min), _hz_to_mel_slaney(f_max), n_mels + 2))
    fft_hz = np.linspace(0, sampling_rate // 2, n_freq)
    width = np.diff(edges)
    dist = edges[None, :] - fft_hz[:, None]  # [n_freq, n_mels+2]
    rising = -dist[:, :-2] / width[:-1]
    falling = dist[:, 2:] / width[1:]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    return bank * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_MEL_BLOCK_FRAMES = 256  # STFT frames computed at once (bounds log_mel's memory whatever the clip's length)


def log_mel(
    audio: np.ndarray,
    n_mels: int = 128,
    n_fft: int = 400,
    hop_length: int = 160,
    sampling_rate: int = 16000,
    filters: np.ndarray | None = None,
) -> np.ndarray:
    """Whisper log-mel [n_mels, len(audio) // hop]: centred STFT (reflect pad), periodic Hann, power,
    log10 floored at 1e-10, clamped to 8 decades below the maximum, then (x + 4) / 4."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"log_mel takes mono audio, got shape {x.shape}")
    if x.size <= n_fft // 2:
        raise ValueError(f"audio of {x.size} samples is shorter than half an STFT window ({n_fft // 2})")
    if filters is None:
        filters = mel_filter_bank(n_mels, n_fft, sampling_rate, 0.0, sampling_rate / 2)
    half = n_fft // 2
    padded = np.pad(x.astype(np.float64), (half, half), mode="reflect")
    n_frames = 1 + (padded.size - n_fft) // hop_length
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    # Frames in blocks, then in place: a whole 30 s clip at once would hold ~45 MiB of float64 temporaries.
    mel = np.empty((n_frames, filters.shape[1]))
    for start in range(0, n_frames, _MEL_BLOCK_FRAMES):
        frames = np.arange(start, min(n_frames, start + _MEL_BLOCK_FRAMES))
        idx = np.arange(n_fft)[None, :] + hop_length * frames[:, None]
        spec = np.fft.rfft(padded[idx] * window[None, :], n=n_fft, axis=1)
        mel[frames] = (spec.real**2 + spec.imag**2) @ filters  # power [frames, n_freq] -> mel bands
    logs = mel[:-1]  # Whisper drops the last frame
    np.log10(np.maximum(logs, 1e-10, out=logs), out=logs)
    np.maximum(logs, logs.max() - 8.0, out=logs)
    logs += 4.0
    logs /= 4.0
    return logs.T.astype(np.float32)


# ---------------------------------------------------------------- audio: encoder chunk metadata


def conv_output_length(frames: np.ndarray | int, n_window: int = 50) -> np.ndarray | int:
    """Tokens the audio encoder makes from `frames` mel frames: three stride-2 convs per chunk of
    2*n_window frames (a full chunk of 100 frames gives 13). Same formula as transformers'
    `_get_feat_extract_output_lengths`; it is also the number of <|audio_pad|> tokens."""
    chunk = 2 * n_window
    rest = np.asarray(frames) % chunk
    per_full = _stride2_len(_stride2_len(_stride2_len(chunk)))
    out = _stride2_len(_stride2_len(_stride2_len(rest))) + (np.asarray(frames) // chunk) * per_full
    return int(out) if np.ndim(out) == 0 else out


def _stride2_len(n: np.ndarray | int) -> np.ndarray | int:
    return (np.asarray(n) - 1) // 2 + 1


def num_audio_tokens(num_frames: int, n_window: int = 50) -> int:
    return int(conv_output_length(int(num_frames), n_window))


@dataclass
class AudioChunks:
    """Inputs of the audio graph for one clip."""

    padded_features: np.ndarray  # float32 [num_chunks, n_mels, 2*n_window]
    chunk_lengths: np.ndarray  # int64 [num_chunks] frames before padding
    valid_indices: np.ndarray  # int64 [num_tokens] into num_chunks * tokens_per_full_chunk
    window_ids: np.ndarray  # int64 [num_tokens] attention window of each token
    cu_seqlens: np.ndarray  # int32 [num_windows + 1] window boundaries (transformers' form)
    num_frames: int
    num_tokens: int


def audio_chunks(features: np.ndarray, n_window: int = 50, n_window_infer: int = 800) -> AudioChunks:
    """Split a log-mel [n_mels, frames] into encoder chunks and compute which conv outputs are real tokens
    and which attention window each belongs to (transformers: chunk_and_pad_features, get_valid_indices,
    get_audio_cu_seqlens). Chunks are padded to the longest chunk, as transformers does: padding a short
    clip further would let the conv biases of the padding leak into its last tokens."""
    n_mels, frames = features.shape
    if frames < 1:
        raise ValueError("no mel frames")
    chunk = 2 * n_window
    num_chunks = -(-frames // chunk)
    lengths = np.full(num_chunks, chunk, dtype=np.int64)
    if frames % chunk:
        lengths[-1] = frames % chunk
    longest = int(lengths.max())
    padded = np.zeros((num_chunks, n_mels, longest), dtype=np.float32)
    for c in range(num_chunks):
        seg = features[:, c * chunk : c * chunk + lengths[c]]
        padded[c, :, : seg.shape[1]] = seg

    per_chunk = np.asarray(conv_output_length(lengths, n_window), dtype=np.int64)
    full = int(conv_output_length(longest, n_window))  # conv outputs of a padded chunk
    valid = (np.arange(full)[None, :] < per_chunk[:, None]).reshape(-1).nonzero()[0].astype(np.int64)

    total = int(conv_output_length(frames, n_window))
    window = full * (n_window_infer // chunk)  # tokens per attention window
    sizes = [window] * (total // window) + ([total % window] if total % window else [])
    cu = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    window_ids = (np.searchsorted(cu[1:], np.arange(total), side="right")).astype(np.int64)
    assert valid.size == total, (valid.size, total)
    return AudioChunks(padded, lengths, valid, window_ids, cu, frames, total)


# ---------------------------------------------------------------- images: Qwen2-VL patches


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow bicubic resize of an RGB uint8 image to (height, width); a no-op when it already fits."""
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(
        Image.fromarray(image, "RGB").resize((w, h), resample=getattr(Image, "Resampling", Image).BICUBIC)
    )


def patchify(
    image: np.ndarray,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB uint8 HxWx3 (already at the target size) -> (pixel_values [gh*gw, 3*T*P*P] float32, (1, gh, gw)).

    Rows go merge-group by merge-group (each 2x2 block of neighbouring patches is consecutive), columns
    are channel, then the repeated frame, then the patch's pixels: Qwen2VLImageProcessor's order.
    """
    h, w, c = image.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"image {h}x{w} is not a multiple of patch*merge = {unit}")
    x = (image.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x.transpose(2, 0, 1)  # CHW
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    pixel_values = np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size))
    return pixel_values, (1, gh, gw)


def image_inputs(
    image: np.ndarray,
    size: tuple[int, int],
    patch_size: int = 16,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize to the bundle's fixed size, then patchify: the vision graph's `pixel_values` and its grid."""
    return patchify(resize_image(image, size), patch_size, temporal_patch_size, merge_size, mean, std)
