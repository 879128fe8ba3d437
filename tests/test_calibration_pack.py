"""Calibration packs: the committed one is small, covers the 30B recipe, and turns into real requests;
packs with media files work; a pack that lacks a requested modality or has too few requests is an error."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from omniedge.compress.calibration import build_requests, get_source, modality_counts
from omniedge.compress.calibration_pack import DEFAULT_PACK, FORMAT, PACK_FILE, VERSION, read_pack
from omniedge.compress.recipe import load_recipe
from omniedge.errors import OmniedgeError

REPO = Path(__file__).resolve().parents[1]
PACK = DEFAULT_PACK
RECIPE_30B = REPO / "recipes" / "qwen3-omni-30b-prune50-int4.yaml"


def test_committed_pack_is_small_and_covers_the_30b_recipe() -> None:
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    assert size < 15 << 20  # travels with the repository to a machine that can fetch nothing
    pack = read_pack(PACK)
    recipe = load_recipe(RECIPE_30B)
    cal, mea = recipe["calibration"], recipe["measure"]
    assert cal["source"] == "pack" and cal["path"] is None  # the shipped pack
    have = pack["counts"]
    for kind, n in modality_counts(cal["samples"], cal["mix"]).items():
        assert have["calibration"].get(kind, 0) >= n
    for kind, key in (("text", "texts"), ("image", "images"), ("audio", "audios")):
        assert have["heldout"][kind] >= mea[key]
    texts = {
        s: {e["reply"] for e in pack["splits"][s] if e["kind"] == "text"} for s in ("calibration", "heldout")
    }
    assert not texts["calibration"] & texts["heldout"]  # held out means never calibrated on
    speech = [e["audio"]["speech"] for e in pack["splits"]["heldout"] if e["kind"] == "audio"]
    assert speech and all(s["text"] and s["voice"]["voice"] for s in speech)


def test_committed_pack_gives_text_and_image_requests() -> None:
    pytest.importorskip("skimage")
    settings = {"source": "pack", "path": str(PACK), "seed": 0, "image_size": 448}
    reqs = build_requests(settings, {"text": 3, "image": 4}, "calibration")
    texts, images = reqs[:3], reqs[3:]
    assert all(r.image is None and r.audio is None and len(r.reply) > 1000 for r in texts)
    assert all(
        r.image is not None and r.image.shape == (448, 448, 3) and r.image.dtype == np.uint8 for r in images
    )
    assert len({r.image.tobytes() for r in images}) == 4  # photo crops and rendered scenes, all different
    again = build_requests(settings, {"image": 4}, "calibration")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(images, again, strict=True))  # reproducible


def _write_wav(path: Path, seconds: float, rate: int = 22050) -> None:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())


def _pack(root: Path, entries: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / PACK_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                              "splits": {"calibration": entries, "heldout": []}}))  # fmt: skip
    return root


def test_pack_with_media_files(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "pack"
    (root / "media").mkdir(parents=True)
    Image.fromarray(np.full((50, 80, 3), 200, np.uint8)).save(root / "media" / "grey.png")
    _write_wav(root / "media" / "tone.wav", 1.5)
    _pack(root, [
        {"kind": "image", "prompt": "What colour?", "reply": "grey", "image": {"file": "media/grey.png"}},
        {"kind": "audio", "prompt": "What do you hear?", "reply": "a tone", "audio": {"file": "media/tone.wav"}},
    ])  # fmt: skip
    settings = {"source": "pack", "path": str(root), "seed": 0, "image_size": 64}
    img, aud = build_requests(settings, {"image": 1, "audio": 1}, "calibration")
    assert img.image.shape == (64, 64, 3) and int(img.image[10, 10, 0]) == 200
    assert aud.audio.dtype == np.float32 and abs(len(aud.audio) - 24000) <= 1  # resampled to 16 kHz


def test_missing_modality_and_too_few_requests_are_clear_errors(tmp_path: Path) -> None:
    root = _pack(tmp_path / "textonly", [{"kind": "text", "prompt": "", "reply": "Some text."}] * 3)
    settings = {"source": "pack", "path": str(root), "seed": 0, "image_size": 64}
    with pytest.raises(OmniedgeError, match="has 0 audio requests in its calibration split") as e:
        build_requests(settings, {"text": 2, "audio": 1}, "calibration")
    assert "audio" in (e.value.fix or "")
    with pytest.raises(OmniedgeError, match="has 3 text requests"):
        build_requests(settings, {"text": 5}, "calibration")
    with pytest.raises(OmniedgeError, match="calibration pack not found"):
        get_source("pack")(
            "text", 1, {"path": str(tmp_path / "nowhere")}, np.random.default_rng(0), "calibration"
        )
