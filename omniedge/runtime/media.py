"""Decode the user's audio and images into plain arrays, rejecting bad files with a clear message.

Audio: WAV through the stdlib `wave` (PCM 8/16/24/32-bit), other formats through soundfile when it is
installed; always returned as float32 mono at the model's rate, resampled by a windowed-sinc polyphase
filter in numpy (no scipy on the device). Images: Pillow, returned as RGB uint8 HxWx3 with 16-bit and float levels scaled (image_modes.py).
"""

from __future__ import annotations

import math
import struct
import warnings
import wave
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.runtime.image_modes import array_to_rgb8, pil_to_rgb8
from omniedge.runtime.wav_header import truncation_note

MAX_IMAGE_PIXELS = 100_000_000  # 100 MP: beyond this a camera frame is a mistake or an attack
_SOUNDFILE_FIX = "pip install soundfile (FLAC/OGG/float WAV), or convert to 16-bit PCM WAV"

AudioInput = Any  # a path, or (float array, sample_rate)
ImageInput = Any  # a path, or an HxWx3 uint8 array


# ---------------------------------------------------------------- audio


def _pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved PCM bytes -> float32 [frames, channels] in [-1, 1)."""
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"{8 * width}-bit PCM")
    return x.reshape(-1, channels)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(float32 [frames, channels], sample rate) via the stdlib; raises wave.Error/EOFError if it cannot."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if channels < 1 or rate < 1:
        raise wave.Error(f"{channels} channels at {rate} Hz")
    usable = len(raw) // (width * channels) * (width * channels)  # truncated files: keep whole frames
    return _pcm_to_float(raw[:usable], width, channels), rate


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return data, int(rate)


def _soundfile_available() -> bool:
    try:
        import soundfile  # noqa: F401
    except (ImportError, OSError):  # OSError: the wheel is there but libsndfile is not
        return False
    return True


def _check_file(p: Path, what: str) -> None:
    if p.is_dir():
        raise OmniedgeError(f"{p} is a directory, not an {what} file", f"pass one {what} file inside it")
    if not p.is_file():
        raise OmniedgeError(f"{what} file not found: {p}", "check the path")


def read_audio_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio file to (float32 [frames, channels], rate); OmniedgeError if it cannot be read."""
    p = Path(path)
    _check_file(p, "audio")
    if p.stat().st_size == 0:
        raise OmniedgeError(f"audio file {p} is empty (0 bytes)", "record or copy the audio again")
    is_wav = p.suffix.lower() in (".wav", ".wave")
    wav_error: Exception | None = None
    if is_wav:
        try:
            return read_wav(p)
        except (
            wave.Error,
            EOFError,
            ValueError,
            RuntimeError,
            OSError,
            struct.error,
        ) as e:  # float WAV, damage
            wav_error = e
    if _soundfile_available():
        try:
            return _read_soundfile(p)
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for corrupt data
            raise OmniedgeError(
                f"cannot decode audio file {p}: {wav_error or e}", "pass a valid WAV, FLAC or OGG file"
            ) from e
    if wav_error is not None:
        raise OmniedgeError(f"cannot decode WAV file {p}: {wav_error}", _SOUNDFILE_FIX) from wav_error
    raise OmniedgeError(f"cannot decode {p.suffix or 'this'} audio without soundfile", _SOUNDFILE_FIX)


def _kaiser(x: np.ndarray, beta: float) -> np.ndarray:
    """Continuous Kaiser window on [-1, 1] (zero outside)."""
    inside = np.abs(x) <= 1.0
    arg = np.sqrt(np.clip(1.0 - x * x, 0.0, None))
    return np.where(inside, np.i0(beta * arg) / np.i0(beta), 0.0)


def resample(
    x: np.ndarray, rate_in: int, rate_out: int, zero_crossings: int = 16, beta: float = 8.0
) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by a Kaiser-windowed sinc, evaluated polyphase.

    Output sample m sits at input time m * rate_in / rate_out; its taps come from a table with one row
    per distinct fractional offset (rate_out / gcd rows), each row normalised to unit DC gain. The
    cutoff is the lower Nyquist, so downsampling removes what would alias.
    """
    x = np.asarray(x, dtype=np.float32)
    if rate_in == rate_out or x.size == 0:
        return x.copy()
    g = math.gcd(int(rate_in), int(rate_out))
    up, down = rate_out // g, rate_in // g
    scale = min(1.0, rate_out / rate_in)  # cutoff relative to the input Nyquist
    half = zero_crossings / scale  # filter half-width in input samples
    w = math.ceil(half)
    offs = np.arange(-w + 1, w + 1, dtype=np.float64)  # tap positions relative to floor(t)
    phases = np.arange(up, dtype=np.float64) / up
    d = offs[None, :] - phases[:, None]  # [up, taps] distance from the output instant
    table = scale * np.sinc(scale * d) * _kaiser(d / half, beta)
    table /= table.sum(axis=1, keepdims=True)
    table = table.astype(np.float32)

    n_out = -(-x.size * up // down)
    padded = np.concatenate([np.zeros(w, np.float32), x, np.zeros(w + 1 + down, np.float32)])
    out = np.empty(n_out, np.float32)
    step = padded.strides[0]
    # Outputs sharing a phase are `up` apart and read input windows `down` apart: one strided matmul each.
    for first in range(min(up, n_out)):
        base, phase = divmod(first * down, up)
        count = (n_out - first + up - 1) // up
        windows = np.lib.stride_tricks.as_strided(
            padded[base + 1 :], shape=(count, table.shape[1]), strides=(down * step, step)
        )
        out[first::up] = windows @ table[phase]
    return out


def load_audio(
    source: AudioInput,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    min_samples: int = 400,
    notes: list[str] | None = None,
) -> np.ndarray:
    """float32 mono at `sampling_rate` from a path or (array, rate); errors for empty/corrupt/too long input.

    All-zero (silent) audio is valid. `min_samples` guards the STFT, which needs one window of signal.
    A WAV shorter than its header says is used as it is, with a warning appended to `notes` (a Python
    warning when `notes` is None): never silently.
    """
    where = "audio"
    if isinstance(source, (str, Path)):
        data, rate = read_audio_file(source)
        where = f"audio file {source}"
        note = truncation_note(source)
        if note is not None:
            if notes is None:
                warnings.warn(note, stacklevel=2)
            else:
                notes.append(note)
    elif isinstance(source, tuple) and len(source) == 2:
        data, rate = source
        try:
            rate = int(rate)
            data = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise OmniedgeError(
                f"audio array could not be read as float32 ({e})", "pass (np.float32 array, rate)"
            ) from e
        if rate <= 0:
            raise OmniedgeError(f"audio sample rate must be positive, got {rate}", "pass (array, 16000)")
        if data.ndim == 2 and data.shape[0] < data.shape[1] and data.shape[0] <= 8:
            data = data.T  # [channels, frames] -> [frames, channels]
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2:
            raise OmniedgeError(
                f"audio array must be 1-D or [frames, channels], got {data.shape}", "pass mono"
            )
    else:
        raise OmniedgeError(
            f"audio must be a file path or (array, sample_rate), got {type(source).__name__}",
            "pass audio='speech.wav' or audio=(samples, 16000)",
        )
    if data.shape[0] == 0:
        raise OmniedgeError(f"{where} holds no samples", "pass a recording at least 25 ms long")
    if not np.isfinite(data).all():
        raise OmniedgeError(f"{where} contains NaN or infinite samples", "pass finite samples in [-1, 1]")
    seconds = data.shape[0] / rate
    if max_seconds is not None and seconds > max_seconds:
        raise OmniedgeError(
            f"{where} is {seconds:.1f} s long; this bundle takes at most {max_seconds:g} s",
            f"trim it to {max_seconds:g} s or split it into parts",
        )
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    out = resample(mono, rate, sampling_rate)
    if out.size < min_samples:
        raise OmniedgeError(
            f"{where} is too short ({seconds * 1000:.1f} ms); the model needs at least "
            f"{1000 * min_samples / sampling_rate:.0f} ms",
            "pass a longer recording",
        )
    return out


# ---------------------------------------------------------------- images


def _check_size(w: int, h: int, where: str) -> None:
    if w < 1 or h < 1:
        raise OmniedgeError(f"{where} has no pixels ({w}x{h})", "pass a real picture")
    if w * h > MAX_IMAGE_PIXELS:
        raise OmniedgeError(
            f"{where} is {w}x{h} = {w * h / 1e6:.0f} MP, above the {MAX_IMAGE_PIXELS // 1_000_000} MP limit",
            "downscale it first (the model sees it at a few hundred pixels anyway)",
        )


def load_image(source: ImageInput) -> np.ndarray:
    """RGB uint8 HxWx3 from a path or an array; errors for missing, corrupt, empty or huge images."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (str, Path)):
        p = Path(source)
        _check_file(p, "image")
        try:
            with Image.open(p) as img:
                _check_size(*img.size, f"image {p}")  # header only: a bomb is refused before decoding
                img.load()
                return pil_to_rgb8(img, f"image {p}")
        except OmniedgeError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise OmniedgeError(
                f"cannot decode image {p}: {e}", "pass a valid PNG, JPEG, BMP or WebP file"
            ) from e
    if isinstance(source, Image.Image):
        _check_size(*source.size, "image")
        return pil_to_rgb8(source)
    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            _check_size(source.shape[1], source.shape[0], "image array")
        return array_to_rgb8(source)
    raise OmniedgeError(
        f"image must be a file path or an HxWx3 array (uint8, uint16 or float 0..1), got {type(source).__name__}",
        "pass image='photo.jpg' or image=np.asarray(...)",
    )
