"""Audio and image decoding: formats, resampling quality, and a clear OmniedgeError for every bad input."""

from __future__ import annotations

import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniedge.errors import OmniedgeError
from omniedge.runtime.media import load_audio, load_image, read_audio_file, resample


def _write_wav(path: Path, x: np.ndarray, rate: int, width: int) -> Path:
    """x float [frames, channels] in [-1, 1) -> PCM WAV of `width` bytes per sample."""
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if width == 1:
        raw = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 2:
        raw = np.clip(np.round(x * 32768), -32768, 32767).astype("<i2").tobytes()
    elif width == 3:
        v = np.clip(np.round(x * (1 << 23)), -(1 << 23), (1 << 23) - 1).astype(np.int32).reshape(-1)
        b = v.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        raw = b.tobytes()
    else:
        raw = np.clip(np.round(x * (1 << 31)), -(1 << 31), (1 << 31) - 1).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def _tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


# ---------------------------------------------------------------- WAV decoding


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_decode_to_the_same_signal(tmp_path: Path, width: int) -> None:
    x = _tone(440, 16000, 0.5)
    data, rate = read_audio_file(_write_wav(tmp_path / f"w{width}.wav", x, 16000, width))
    assert rate == 16000 and data.shape == (x.size, 1) and data.dtype == np.float32
    tol = {1: 1 / 128, 2: 1 / 32768, 3: 1 / (1 << 23), 4: 1e-7}[width]
    np.testing.assert_allclose(data[:, 0], x, atol=tol)


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    left, right = _tone(440, 16000, 0.5, 0.4), _tone(660, 16000, 0.5, 0.2)
    f = _write_wav(tmp_path / "st.wav", np.stack([left, right], 1), 16000, 2)
    mono = load_audio(f)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=2e-4)


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_tone_matches_the_analytic_tone(rate: int) -> None:
    x = _tone(1000, rate, 1.0)
    y = resample(x, rate, 16000)
    assert y.size == 16000
    expect = _tone(1000, 16000, 1.0)
    mid = slice(400, -400)  # away from the zero-padded edges
    assert np.abs(y[mid] - expect[mid]).max() < 2e-3


def test_downsampling_removes_what_would_alias() -> None:
    x = _tone(12000, 48000, 1.0)  # above the 8 kHz Nyquist of 16 kHz audio: would fold to 4 kHz
    y = resample(x, 48000, 16000)
    assert np.sqrt(np.mean(y[400:-400] ** 2)) < 1e-3  # input RMS is 0.35


def test_resampling_keeps_dc_and_silence() -> None:
    np.testing.assert_allclose(
        resample(np.full(44100, 0.25, np.float32), 44100, 16000)[100:-100], 0.25, atol=1e-6
    )
    assert not resample(np.zeros(22050, np.float32), 22050, 16000).any()


def test_array_input_with_its_rate(tmp_path: Path) -> None:
    y = load_audio((_tone(500, 44100, 0.5).astype(np.float32), 44100))
    assert y.dtype == np.float32 and y.size == 8000


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("soundfile"),
    reason="soundfile not installed (FLAC is optional)",
)
def test_flac_through_soundfile(tmp_path: Path) -> None:
    import soundfile

    x = _tone(300, 22050, 0.5)
    soundfile.write(str(tmp_path / "a.flac"), x, 22050, subtype="PCM_16")
    y = load_audio(tmp_path / "a.flac")
    assert y.size == 8000
    np.testing.assert_allclose(y[400:-400], _tone(300, 16000, 0.5)[400:-400], atol=2e-3)


# ---------------------------------------------------------------- audio errors


def test_silent_audio_is_fine(tmp_path: Path) -> None:
    y = load_audio(_write_wav(tmp_path / "quiet.wav", np.zeros(8000), 16000, 2))
    assert y.size == 8000 and not y.any()


def test_missing_audio(tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_empty_audio(tmp_path: Path) -> None:
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(OmniedgeError, match="empty"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(OmniedgeError, match="no samples"):
        load_audio(_write_wav(tmp_path / "noframes.wav", np.zeros(0), 16000, 2))
    with pytest.raises(OmniedgeError, match="no samples"):
        load_audio((np.zeros(0, np.float32), 16000))


def test_corrupt_audio(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunkjunk" + bytes(range(200)))
    with pytest.raises(OmniedgeError, match="cannot decode") as e:
        load_audio(bad)
    assert e.value.fix


def test_without_soundfile_float_wav_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import omniedge.runtime.media as media

    monkeypatch.setattr(media, "_soundfile_available", lambda: False)
    f = tmp_path / "float.wav"  # WAVE_FORMAT_IEEE_FLOAT (3): the stdlib reader refuses it
    payload = np.zeros(1600, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(payload))
        + payload
    )
    f.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(OmniedgeError, match="cannot decode WAV") as e:
        load_audio(f)
    assert "soundfile" in (e.value.fix or "")
    (tmp_path / "a.flac").write_bytes(b"fLaC" + bytes(64))
    with pytest.raises(OmniedgeError, match="without soundfile"):
        load_audio(tmp_path / "a.flac")


def test_too_long_and_too_short_audio(tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="at most 2 s"):
        load_audio(_write_wav(tmp_path / "long.wav", np.zeros(16000 * 3), 16000, 2), max_seconds=2)
    with pytest.raises(OmniedgeError, match="too short"):
        load_audio((np.zeros(100, np.float32), 16000))


def test_bad_audio_arrays() -> None:
    with pytest.raises(OmniedgeError, match="NaN"):
        load_audio((np.full(1000, np.nan, np.float32), 16000))
    with pytest.raises(OmniedgeError, match="sample rate"):
        load_audio((np.zeros(1000, np.float32), 0))
    with pytest.raises(OmniedgeError, match="path or"):
        load_audio(12345)


# ---------------------------------------------------------------- images


def test_png_and_transparency(tmp_path: Path) -> None:
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.shape == (8, 10, 3) and img.dtype == np.uint8
    assert (img[:, :5] == [200, 0, 0]).all()
    assert (img[:, 5:] == 255).all()  # transparency composited onto white, as transformers does


def test_grayscale_jpeg_and_arrays(tmp_path: Path) -> None:
    Image.fromarray(np.full((16, 16), 90, np.uint8), "L").save(tmp_path / "g.jpg")
    img = load_image(tmp_path / "g.jpg")
    assert img.shape == (16, 16, 3) and abs(int(img.mean()) - 90) <= 1
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(load_image(arr), arr)


def test_image_errors(tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="not found"):
        load_image(tmp_path / "none.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    with pytest.raises(OmniedgeError, match="cannot decode image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(OmniedgeError, match="no pixels"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(OmniedgeError, match="scale is unknown"):
        load_image(np.full((4, 4, 3), 300.5, np.float32))
    with pytest.raises(OmniedgeError, match="HxWx3"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w x h pixels (the check must refuse it before decoding anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_huge_image_is_refused_from_its_header(tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="MP"):
        load_image(_png_header_only(tmp_path / "huge.png", 20000, 20000))
