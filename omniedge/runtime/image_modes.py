"""Any picture -> RGB uint8, with its levels scaled, never clipped.

Pillow's `convert("RGB")` clips 16-bit greyscale (I;16), 32-bit integer (I) and float (F) images to
0..255, so a 16-bit depth or industrial-camera PNG turns white and a 0..1 float TIFF black. Those modes
are scaled here: 16-bit by 255/65535, float 0..1 by 255; a float image whose range is neither 0..1 nor
0..255 is refused (its scale is unknown). Pillow already reduces 16-bit RGB/RGBA/LA PNGs to 8 bits
correctly, and converts CMYK (Adobe-inverted JPEGs included) and palette images; transparency is
composited onto white, as transformers' image processors do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError

_FLOAT_FIX = "save it as 8- or 16-bit PNG, or scale it to 0..1 (or pass a uint8 array)"


def levels_to_uint8(a: np.ndarray, where: str) -> np.ndarray:
    """uint8 levels of an integer or float array: uint8 as is, 16-bit (uint16, or ints within 0..65535)
    scaled by 255/65535, float within 0..1 by 255, float within 0..255 rounded; anything else refused."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise OmniedgeError(
                f"{where} holds integers from {lo} to {hi}: not 8- or 16-bit levels", _FLOAT_FIX
            )
        return np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise OmniedgeError(f"{where} contains NaN or infinite values", _FLOAT_FIX)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            return np.round(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.round(a).astype(np.uint8)
        raise OmniedgeError(
            f"{where} holds float values from {lo:g} to {hi:g}, neither 0..1 nor 0..255: its scale is unknown",
            _FLOAT_FIX,
        )
    raise OmniedgeError(f"{where} has pixel type {a.dtype}", "pass uint8, uint16 or float pixels")


def _composite_on_white(img: Any) -> Any:
    from PIL import Image

    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba)


def _deep_grey_to_la(img: Any, where: str) -> Any:
    """I;16*, I and F images -> 8-bit L (or LA when a tRNS grey value marks transparent pixels)."""
    from PIL import Image

    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a = a.astype(np.uint16)
    grey = levels_to_uint8(a, where)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int) and img.mode != "F":
        alpha = np.where(a == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey, "L")


def pil_to_rgb8(img: Any, where: str = "image") -> np.ndarray:
    """RGB uint8 HxWx3 from a Pillow image of any mode, levels scaled (see the module doc)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _deep_grey_to_la(img, where)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = _composite_on_white(img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def array_to_rgb8(a: np.ndarray, where: str = "image array") -> np.ndarray:
    """RGB uint8 HxWx3 from an HxW, HxWx3 or HxWx4 array of uint8, uint16 or float (0..1) pixels."""
    from PIL import Image

    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise OmniedgeError(f"image array must be HxWx3, got shape {a.shape}", "pass an RGB uint8 array")
    a = levels_to_uint8(a, where)
    if a.shape[2] == 4:
        return pil_to_rgb8(Image.fromarray(np.ascontiguousarray(a), "RGBA"))
    return np.ascontiguousarray(a)
