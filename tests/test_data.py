"""The omni-mini data builders: layout contract, disjoint splits, determinism, real audio and images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniedge.data import scenes, speech
from omniedge.data.build import TASKS, build_dataset, load_split
from omniedge.data.text_corpus import SPLITS, clean_text, normalise_sentence, sentence_key, sentences_of
from omniedge.errors import OmniedgeError

sf = pytest.importorskip("soundfile")

REQUIRED = {
    "text": {"text"},
    "image": {"image", "prompt", "answer", "task"},
    "speech": {"audio", "text", "voice", "speed", "pitch", "noise_db", "seconds"},
    "mixed": {"image", "audio", "prompt", "answer"},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("data") / "small", size="small", seed=0)


def test_layout_contract(root: Path) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["size"] == "small" and manifest["builder_version"] >= 1
    assert {"shakespeare", "wikipedia", "wordnet", "fortunes"} <= set(manifest["sources"])
    assert all(src["licence"] for src in manifest["sources"].values())
    for task in TASKS:
        for split in SPLITS:
            rows = load_split(root, task, split)
            assert len(rows) == manifest["counts"][task][split] > 0, (task, split)
            for row in rows:
                assert REQUIRED[task] <= set(row), (task, split, row)
                for key in ("image", "audio", "mel"):
                    if key in row:
                        assert (root / row[key]).is_file(), row[key]
    for shard in (root / "speech" / "mel").glob("*.features.npy"):
        assert shard.stat().st_size <= 64 * 2**20


def test_text_splits_share_no_sentences(root: Path) -> None:
    keys = {
        s: {k for r in load_split(root, "text", s) for k in map(sentence_key, sentences_of(r["text"])) if k}
        for s in SPLITS
    }
    assert min(len(k) for k in keys.values()) > 50
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )
    docs = {s: {(r["source"], r["doc"]) for r in load_split(root, "text", s)} for s in SPLITS}
    assert not docs["train"] & docs["test"] and not docs["train"] & docs["val"]


def test_speech_splits_disjoint_in_sentences_and_voices(root: Path) -> None:
    rows = {s: load_split(root, "speech", s) for s in SPLITS}
    texts = {s: {r["text"] for r in rows[s]} for s in SPLITS}
    assert (
        not texts["train"] & texts["test"]
        and not texts["train"] & texts["val"]
        and not texts["val"] & texts["test"]
    )
    variants = {s: {r["voice"].split("+")[1] for r in rows[s] + load_split(root, "mixed", s)} for s in SPLITS}
    assert not variants["train"] & variants["test"] and not variants["train"] & variants["val"]
    train_text = {
        k for r in load_split(root, "text", "train") for k in map(sentence_key, sentences_of(r["text"]))
    }
    assert not texts["test"] & train_text  # a test utterance is not even in the training text
    for r in rows["train"]:
        words = r["text"].split()
        assert (
            3 <= len(words) <= 10
            and r["text"] == r["text"].lower()
            and not any(c.isdigit() for c in r["text"])
        )


def test_scene_layouts_in_one_split_only(root: Path) -> None:
    layouts = {s: {r["layout"] for r in load_split(root, "image", s) if "layout" in r} for s in SPLITS}
    assert all(layouts.values())
    assert (
        not layouts["train"] & layouts["val"]
        and not layouts["train"] & layouts["test"]
        and not layouts["val"] & layouts["test"]
    )
    for s in SPLITS:  # mixed questions are about scenes of their own split
        assert {r["layout"] for r in load_split(root, "mixed", s)} <= layouts[s]


def test_build_is_deterministic_and_cached(root: Path, tmp_path: Path) -> None:
    first = json.loads((root / "manifest.json").read_text())
    again = build_dataset(tmp_path / "again", size="small", seed=0)
    second = json.loads((again / "manifest.json").read_text())
    assert second["files_sha256"] == first["files_sha256"]
    assert second["content_sha256"] == first["content_sha256"]
    mtime = (again / "manifest.json").stat().st_mtime_ns
    assert build_dataset(again, size="small", seed=0) == again  # cached: nothing rebuilt
    assert (again / "manifest.json").stat().st_mtime_ns == mtime


def test_audio_is_16k_nonsilent_and_as_long_as_said(root: Path) -> None:
    for task in ("speech", "mixed"):
        for row in load_split(root, task, "test")[:6] + load_split(root, task, "train")[:6]:
            audio, rate = sf.read(root / row["audio"], dtype="int16")
            assert rate == 16000 and audio.ndim == 1
            assert abs(len(audio) / rate - row["seconds"]) < 1e-3
            words = len((row.get("text") or row["question"]).split())
            seconds_per_word = row["seconds"] / words
            assert 0.15 < seconds_per_word < 1.2, (row, seconds_per_word)
            x = audio.astype(np.float64) / 32768
            loud = 20 * np.log10(np.sqrt(np.mean(x[np.abs(x) > 10 ** (row["noise_db"] / 20) * 4] ** 2)))
            assert loud > row["noise_db"] + 15, (row, loud)  # speech well above the added noise
            mel = np.load(root / row["mel"], mmap_mode="r")[
                row["mel_start"] : row["mel_start"] + row["mel_frames"]
            ]
            assert mel.shape == (len(audio) // 160, 128) and mel.dtype == np.float16
            np.testing.assert_allclose(
                mel.astype(np.float32), speech.log_mel(audio).astype(np.float32), atol=1e-3
            )


def _palette_name(rgb: np.ndarray) -> str | None:
    for name, ref in scenes.COLOURS.items():
        if np.abs(rgb.astype(int) - np.array(ref)).max() <= 2:
            return name
    return None


def test_image_answers_match_rendered_pixels(root: Path) -> None:
    checked = 0
    for split in SPLITS:
        with (root / "image" / f"{split}.scenes.jsonl").open() as f:
            drawn = {d["image"]: d for d in map(json.loads, f)}
        for row in load_split(root, "image", split):
            img = np.asarray(Image.open(root / row["image"]).convert("RGB"))
            assert img.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
            if row["task"] == "photo":
                assert row["answer"] == scenes.PHOTOS[row["photo"]]
                continue
            assert drawn[row["image"]]["layout"] == row["layout"]
            shapes = [o for o in drawn[row["image"]]["objects"] if o["shape"] != "word"]
            for o in shapes:  # the pixel at each shape's centre has the shape's colour
                assert _palette_name(img[o["y"], o["x"]]) == o["colour"], (row["image"], o)
            if row["task"] == "count":  # re-detect: cells that hold any palette-coloured pixel
                half = scenes.IMAGE_SIZE // 2
                cells = [img[y : y + half, x : x + half].reshape(-1, 3) for y in (0, half) for x in (0, half)]
                found = sum(any(_palette_name(p) for p in cell[::3]) for cell in cells)
                assert scenes.NUMBERS[found] == row["answer"], row["image"]
                checked += 1
            elif row["task"] == "colour":
                kind = row["prompt"].removeprefix("what colour is the ").rstrip("?")
                (o,) = [o for o in shapes if o["shape"] == kind]
                assert _palette_name(img[o["y"], o["x"]]) == row["answer"]
                checked += 1
            elif row["task"] == "where":
                colour, kind = row["prompt"].removeprefix("where is the ").rstrip("?").split()
                (o,) = [o for o in shapes if (o["colour"], o["shape"]) == (colour, kind)]
                half = scenes.IMAGE_SIZE // 2
                cell = ("top" if o["y"] < half else "bottom") + (" left" if o["x"] < half else " right")
                assert cell == row["answer"] and _palette_name(img[o["y"], o["x"]]) == colour
                checked += 1
    assert checked > 100


def test_missing_espeak_names_the_pip_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # as if the wheel were not installed
    with pytest.raises(OmniedgeError) as err:
        build_dataset(tmp_path / "x", size="small", seed=123)
    assert "espeak-ng" in err.value.problem and "pip install espeakng-loader" in (err.value.fix or "")
    assert not (tmp_path / "x").exists()


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError):
        build_dataset(tmp_path / "y", size="huge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OmniedgeError, match="is not a previous omni-mini dataset"):
        build_dataset(tmp_path / "mine", size="small")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(OmniedgeError):
        load_split(tmp_path, "video", "train")
    with pytest.raises(OmniedgeError):
        load_split(tmp_path, "text", "train")


def test_cleaning_and_normalising() -> None:
    play = "ACT I.\n\nScene I. A room.\n\n[Enter Bernardo.]\n\nBer.\nWho's there?\n\nFran.\nNay, answer me: stand,\nand unfold yourself."
    assert clean_text(play, "shakespeare") == "Who's there?\nNay, answer me: stand, and unfold yourself."
    assert clean_text("a <b>bold</b>   _word_\n\n\nnext", "wikipedia") == "a bold word\nnext"
    assert normalise_sentence("Well-known facts, don't they?") == "well known facts don't they"
    assert normalise_sentence("Born in 1918.") is None
