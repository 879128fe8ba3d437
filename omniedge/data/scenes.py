"""Images with known content: rendered shape scenes (questions with checkable answers) and scikit-image photos.

A scene is a 2 x 2 grid of cells (top left, top right, bottom left, bottom right); each cell is empty or
holds one shape of one colour, or a short word. The *layout* (what is in which cell) decides the split,
so a layout never appears in two splits; the exact position and size inside the cell are jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from omniedge.errors import OmniedgeError

IMAGE_SIZE = 64  # pixels, square: 4 x 4 patches of 16 -> 2 x 2 = 4 vision tokens after the 2 x 2 merge
CELLS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
}
WORDS = ("cat", "dog", "sun", "box", "red", "car", "hat", "cup")
NUMBERS = ("zero", "one", "two", "three", "four")

Item = tuple[str, str]  # ("circle", "red") or ("word", "cat")
Layout = tuple[Item | None, ...]  # one entry per cell, in CELLS order


def layout_key(layout: Layout) -> str:
    """Canonical text of a layout: what decides its split."""
    return "|".join("-" if it is None else f"{it[1]} {it[0]}" for it in layout)


def sample_layout(rng: np.random.Generator, word_prob: float = 0.15) -> Layout:
    """1-4 shapes in distinct cells, sometimes a word in one more free cell."""
    n = int(rng.integers(1, 5))
    cells = rng.permutation(4)[:n]
    layout: list[Item | None] = [None] * 4
    for c in cells:
        layout[int(c)] = (
            SHAPES[int(rng.integers(len(SHAPES)))],
            list(COLOURS)[int(rng.integers(len(COLOURS)))],
        )
    free = [i for i in range(4) if layout[i] is None]
    if free and rng.random() < word_prob:
        layout[int(free[int(rng.integers(len(free)))])] = ("word", WORDS[int(rng.integers(len(WORDS)))])
    return tuple(layout)


@dataclass(frozen=True)
class Placed:
    """One drawn object and where it landed (pixel centre and half-size)."""

    cell: str
    shape: str
    colour: str
    x: int
    y: int
    r: int


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def render(
    layout: Layout, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[Image.Image, list[Placed]]:
    """Draw `layout` with random jitter; return the RGB image and what was drawn where."""
    bg = int(rng.integers(0, 60))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    half = size // 2
    placed: list[Placed] = []
    for ci, item in enumerate(layout):
        if item is None:
            continue
        x0, y0 = (ci % 2) * half, (ci // 2) * half
        kind, name = item
        if kind == "word":
            font = _font(max(8, size // 6))
            draw.text((x0 + half // 2, y0 + half // 2), name, fill=(255, 255, 255), font=font, anchor="mm")
            placed.append(Placed(CELLS[ci], "word", name, x0 + half // 2, y0 + half // 2, 0))
            continue
        r = int(rng.integers(max(4, half * 9 // 32), half * 13 // 32 + 1))
        slack = half // 2 - r - 1
        cx = x0 + half // 2 + int(rng.integers(-slack, slack + 1))
        cy = y0 + half // 2 + int(rng.integers(-slack, slack + 1))
        fill = COLOURS[name]
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        elif kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif kind == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        placed.append(Placed(CELLS[ci], kind, name, cx, cy + (r // 3 if kind == "triangle" else 0), r))
    return img, placed


def _describe(layout: Layout) -> str:
    parts = []
    for cell, item in zip(CELLS, layout, strict=True):
        if item is not None:
            article = "an" if item[1][0] in "aeiou" else "a"
            parts.append(f"the word {item[1]}" if item[0] == "word" else f"{article} {item[1]} {item[0]}")
            parts[-1] += f" at the {cell}"
    return " and ".join(parts)


def questions(layout: Layout) -> list[tuple[str, str, str]]:
    """(task, prompt, answer) pairs whose answers the layout alone decides; ambiguous ones are left out."""
    shapes = [(c, it) for c, it in zip(CELLS, layout, strict=True) if it is not None and it[0] != "word"]
    words = [it[1] for it in layout if it is not None and it[0] == "word"]
    out = [
        ("count", "how many shapes are there?", NUMBERS[len(shapes)]),
        ("describe", "describe the image.", _describe(layout)),
    ]
    kinds = [it[0] for _, it in shapes]
    for kind in SHAPES:
        if kinds.count(kind) == 1:
            colour = next(it[1] for _, it in shapes if it[0] == kind)
            out.append(("colour", f"what colour is the {kind}?", colour))
    for cell, (kind, colour) in shapes:
        out.append(("shape", f"what shape is at the {cell}?", kind))
        if sum(1 for _, it in shapes if it == (kind, colour)) == 1:
            out.append(("where", f"where is the {colour} {kind}?", cell))
    if words:
        out.append(("word", "what word is written?", words[0]))
    return out


# scikit-image's bundled photos (offline, no pooch download) and a short caption for each.
PHOTOS: dict[str, str] = {
    "astronaut": "an astronaut",
    "brick": "a brick wall",
    "camera": "a man with a camera",
    "cell": "a cell",
    "checkerboard": "a checkerboard",
    "chelsea": "a cat",
    "clock": "a clock",
    "coffee": "a cup of coffee",
    "coins": "coins",
    "colorwheel": "a colour wheel",
    "grass": "grass",
    "gravel": "gravel",
    "horse": "a horse",
    "hubble_deep_field": "galaxies",
    "immunohistochemistry": "stained tissue",
    "logo": "a logo",
    "moon": "the moon",
    "page": "a page of text",
    "rocket": "a rocket",
    "text": "printed letters",
}


def load_photo(name: str) -> Image.Image:
    """One scikit-image photo as RGB."""
    try:
        import skimage.data
    except ImportError:
        raise OmniedgeError(
            "scikit-image is not installed (its bundled photos are the photo task)",
            'pip install -e ".[offline]"   (scikit-image comes with the offline extra)',
        ) from None
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3].astype(np.uint8), "RGB")


def photo_crop(photo: Image.Image, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """A random square crop (60-100% of the short side), maybe mirrored, resized to `size`."""
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
