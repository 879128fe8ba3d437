"""Pictures a camera or a tool really writes: 16-bit grey and RGB PNG, float and 32-bit TIFF, CMYK; each
comes out as RGB uint8 with its levels scaled (not clipped to white or black), or as one clear error.
Plus the inputs that used to mislead: a directory given as a file, and a WAV cut short."""

from __future__ import annotations

import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniedge.errors import OmniedgeError
from omniedge.runtime.media import load_audio, load_image
from omniedge.runtime.wav_header import truncation_note


def _png16(path: Path, a: np.ndarray, transparent_grey: int | None = None) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): grey, grey+alpha, RGB or RGBA."""
    a = np.asarray(a, np.uint16)
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if a.ndim == 2 else a.shape[2]]
    h, w = a.shape[:2]
    rows = a.reshape(h, -1).astype(">u2").tobytes()
    stride = len(rows) // h
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    trns = chunk(b"tRNS", struct.pack(">H", transparent_grey)) if transparent_grey is not None else b""
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
        + trns
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def _to8(v: np.ndarray | int) -> np.ndarray:
    return np.round(np.asarray(v, np.float64) * 255 / 65535).astype(np.uint8)


def test_16bit_grey_png_is_scaled_not_clipped_white(tmp_path: Path) -> None:
    """The reported case: mean ~127 came out as 254 (Pillow clips I;16 to 255)."""
    ramp = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    img = load_image(_png16(tmp_path / "depth.png", ramp))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], _to8(ramp))
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    assert 120 < img.mean() < 135


def test_16bit_grey_png_with_a_transparent_value(tmp_path: Path) -> None:
    a = np.full((4, 4), 30000, np.uint16)
    a[0, 0] = 7
    img = load_image(_png16(tmp_path / "t.png", a, transparent_grey=7))
    assert (img[0, 0] == 255).all()  # transparent -> white, as for 8-bit images
    assert (img[1, 1] == _to8(30000)).all()


def test_16bit_rgb_and_rgba_png(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32768, 1000
    img = load_image(_png16(tmp_path / "rgb.png", rgb))
    assert img.shape == (4, 6, 3)
    np.testing.assert_allclose(img[0, 0].astype(int), [255, 128, 4], atol=1)  # 16-bit levels / 257
    rgba = np.zeros((4, 6, 4), np.uint16)
    rgba[..., 1], rgba[..., 3] = 65535, 65535
    rgba[:, 3:, 3] = 0  # right half transparent
    img = load_image(_png16(tmp_path / "rgba.png", rgba))
    assert (img[:, :3] == [0, 255, 0]).all() and (img[:, 3:] == 255).all()
    la = np.zeros((4, 4, 2), np.uint16)
    la[..., 0], la[..., 1] = 20000, 65535
    img = load_image(_png16(tmp_path / "la.png", la))
    np.testing.assert_allclose(img.astype(int), int(_to8(20000)), atol=1)


def test_float_images(tmp_path: Path) -> None:
    f = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(f, "F").save(tmp_path / "unit.tiff")  # Pillow would clip 0..1 to black
    img = load_image(tmp_path / "unit.tiff")
    np.testing.assert_array_equal(img[..., 2], np.round(f * 255).astype(np.uint8))
    Image.fromarray(f * 200, "F").save(tmp_path / "levels.tiff")  # 0..255 floats are 8-bit levels
    np.testing.assert_array_equal(
        load_image(tmp_path / "levels.tiff")[..., 0], np.round(f * 200).astype(np.uint8)
    )
    Image.fromarray(f * 5000 - 7, "F").save(tmp_path / "metres.tiff")
    with pytest.raises(OmniedgeError, match="scale is unknown"):
        load_image(tmp_path / "metres.tiff")
    nan = f.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tiff")
    with pytest.raises(OmniedgeError, match="NaN"):
        load_image(tmp_path / "nan.tiff")
    rgb = np.dstack([f, 1 - f, np.zeros_like(f)])  # float arrays from robot code: 0..1
    img = load_image(rgb)
    np.testing.assert_array_equal(img[..., 1], np.round((1 - f) * 255).astype(np.uint8))


def test_32bit_integer_tiff_and_uint16_arrays(tmp_path: Path) -> None:
    a = np.full((4, 4), 40000, np.int32)
    Image.fromarray(a, "I").save(tmp_path / "i.tiff")
    assert (load_image(tmp_path / "i.tiff") == _to8(40000)).all()  # Pillow would clip to 255
    Image.fromarray(np.full((4, 4), 70000, np.int32), "I").save(tmp_path / "big.tiff")
    with pytest.raises(OmniedgeError, match="not 8- or 16-bit"):
        load_image(tmp_path / "big.tiff")
    depth = np.full((3, 5), 65535, np.uint16)
    depth[0, 0] = 0
    img = load_image(depth)
    assert img.shape == (3, 5, 3) and img[0, 0].tolist() == [0, 0, 0] and img[1, 1].tolist() == [255] * 3


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path: Path, fmt: str) -> None:
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:8, :, 0] = 255  # cyan
    cmyk[8:, :, 3] = 128  # half black
    path = tmp_path / f"c.{fmt.lower()}"
    Image.fromarray(cmyk, "CMYK").save(path, format=fmt, quality=100)
    img = load_image(path).astype(int)
    np.testing.assert_allclose(img[2:6, 2:14].mean(axis=(0, 1)), [0, 255, 255], atol=3)
    np.testing.assert_allclose(img[10:14, 2:14].mean(axis=(0, 1)), [127, 127, 127], atol=3)


def test_a_directory_is_not_reported_as_missing(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    with pytest.raises(OmniedgeError, match="is a directory, not an image file") as e:
        load_image(tmp_path / "frames")
    assert "inside it" in (e.value.fix or "")
    with pytest.raises(OmniedgeError, match="is a directory, not an audio file"):
        load_audio(tmp_path / "frames")


def _truncated_wav(path: Path, seconds: float = 2.0, kept: float = 0.67) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    data = path.read_bytes()
    path.write_bytes(data[: 44 + int(16000 * kept) * 2])  # the header still promises 2 s
    return path


def test_truncated_wav_is_used_but_never_silently(tmp_path: Path) -> None:
    f = _truncated_wav(tmp_path / "q.wav")
    note = truncation_note(f)
    assert note is not None and "promises 2.00 s" in note and "holds 0.67 s" in note
    notes: list[str] = []
    y = load_audio(f, notes=notes)
    assert notes == [note] and y.size == int(16000 * 0.67)
    with pytest.warns(UserWarning, match="truncated"):
        load_audio(f)  # no list to carry it: a Python warning
    whole = tmp_path / "whole.wav"
    with wave.open(str(whole), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\0" * 8000)
    assert truncation_note(whole) is None
    load_audio(whole, notes=notes)
    assert notes == [note]
