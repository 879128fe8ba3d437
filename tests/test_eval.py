"""omniedge.eval: metrics with intervals, expert-load statistics, the suite machinery and the CLI shell."""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omniedge.errors import OmniedgeError
from omniedge.eval.experts import ExpertLoad, normalised_entropy, top_share
from omniedge.eval.metrics import (
    accuracy,
    bootstrap_ratio,
    edit_distance,
    normalize_text,
    perplexity,
    retention,
    wilson,
    word_error_rate,
)

# ---------------------------------------------------------------- metrics


def test_wilson_matches_textbook_values() -> None:
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and round(hi, 3) == 0.161
    assert wilson(0, 0) == (0.0, 1.0)


def test_accuracy_estimate() -> None:
    est = accuracy([True] * 90 + [False] * 10)
    assert est.value == pytest.approx(0.9) and est.n == 100
    assert est.lo < 0.9 < est.hi and est.hi - est.lo < 0.15


def test_edit_distance_and_wer() -> None:
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert edit_distance(["a", "b", "c"], ["a", "x", "c"]) == 1  # substitution
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1  # deletion
    assert edit_distance(["a", "b"], ["a", "b", "c", "d"]) == 2  # insertions
    assert edit_distance([], ["a", "b"]) == 2
    est = word_error_rate(["the cat sat", "a dog"], ["the cat sat", "the dog ran"])
    # 0 errors in 3 words + (1 sub + 1 ins) in 2 words = 2 / 5
    assert est.value == pytest.approx(0.4) and est.tokens == 5 and est.n == 2
    assert word_error_rate(["Hello, World!"], ["hello world"]).value == 0.0


def test_normalize_text() -> None:
    assert normalize_text("  The Cat's  HAT!! ") == "the cat's hat"
    assert normalize_text("top-left") == "top left"


def test_perplexity_and_bootstrap() -> None:
    est = perplexity([2.0 * 10, 2.0 * 30], [10, 30])
    assert est.value == pytest.approx(math.exp(2.0)) and est.tokens == 40
    assert est.lo == pytest.approx(est.value) and est.hi == pytest.approx(est.value)  # identical units
    rng = np.random.default_rng(0)
    num = rng.uniform(1, 3, 200) * 50
    lo, hi = bootstrap_ratio(num, np.full(200, 50.0))
    assert lo < num.sum() / (200 * 50) < hi and hi - lo < 0.2


def test_retention_as_the_article() -> None:
    assert retention(0.052, 0.078, lower_is_better=True) == pytest.approx(0.6667, abs=1e-4)  # ASR row
    assert retention(0.923, 0.887, lower_is_better=False) == pytest.approx(0.961, abs=1e-3)  # text row


# ---------------------------------------------------------------- experts


def test_load_statistics() -> None:
    assert normalised_entropy(np.ones(32)) == pytest.approx(1.0)
    assert normalised_entropy(np.eye(32)[0] * 100) == pytest.approx(0.0)
    assert top_share(np.ones(32)) == pytest.approx(0.25)
    skew = np.array([100] * 8 + [0] * 24)
    assert top_share(skew) == pytest.approx(1.0)


def test_expert_load_counts_by_modality() -> None:
    import torch

    load = ExpertLoad(num_layers=1, num_experts=8, top_k=2)
    logits = torch.full((4, 8), -10.0)
    logits[:2, [0, 1]] = 5.0  # text tokens pick experts 0, 1
    logits[2, [6, 7]] = 5.0  # image token picks 6, 7
    logits[3, [0, 7]] = 5.0  # padding: ignored
    load.add([logits], np.array([0, 0, 1, -1]))
    assert load.counts["text"][0].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    assert load.counts["image"][0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    rep = load.report()
    assert rep["text"]["tokens"] == 2 and rep["image"]["tokens"] == 1 and "audio" not in rep
    assert rep["text"]["layers"][0]["top25_share"] == pytest.approx(1.0)


# ---------------------------------------------------------------- suite on the tiny model


def _toy_dataset(root: Path) -> Path:
    """A few rows of every task in omniedge.data's layout (paths relative to the root)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        t = np.arange(16000 * (i + 1) // 2) / 16000
        x = (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t) * 32767).astype(np.int16)
        with wave.open(str(root / "wav" / f"{i}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(x.tobytes())
    rows = {
        "text": [{"text": "the robot sees a red circle and a blue square. " * (i + 2)} for i in range(3)],
        "image": [
            {"image": f"img/{i}.png", "prompt": "how many shapes are there?", "answer": ["one", "two"][i % 2], "task": "count"}
            for i in range(3)
        ],
        "speech": [{"audio": f"wav/{i}.wav", "text": "a red circle", "voice": f"v{i}"} for i in range(3)],
        "mixed": [
            {"image": f"img/{i}.png", "audio": f"wav/{i}.wav", "prompt": "answer.", "answer": "top left", "task": "where"}
            for i in range(3)
        ],
    }  # fmt: skip
    for task, rs in rows.items():
        (root / task).mkdir()
        for split in ("train", "test"):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root


def test_suite_runs_on_tiny(tmp_path: Path) -> None:
    from omniedge.eval.cli import format_result, retention_table
    from omniedge.eval.suite import TorchPredictor, load_suite_data, run_suite
    from omniedge.models.tiny import build_tiny

    model, tok = build_tiny()
    root = _toy_dataset(tmp_path / "ds")
    data = load_suite_data(root, tok, image_size=64, progress=False)
    assert set(data.examples) == {"text", "image", "speech", "mixed"}
    res = run_suite(TorchPredictor(model, tok, image_size=64), data, progress=False)
    text, image, speech = res["tasks"]["text"], res["tasks"]["image"], res["tasks"]["speech"]
    # random weights: perplexity near the vocabulary size, far above the unigram model fitted on the text
    assert 100 < text["value"] < 5 * tok.get_vocab_size()
    assert text["baseline"]["unigram"]["value"] < text["value"]
    assert text["n"] == 3 and text["lo"] <= text["value"] <= text["hi"]
    assert (
        0.0 <= image["value"] <= 1.0
        and image["n"] == 3
        and image["baseline"]["majority"]["value"] == pytest.approx(2 / 3)
    )
    assert speech["metric"] == "wer" and speech["baseline"]["empty"]["value"] == 1.0
    layers = res["experts"]["image"]["layers"]
    assert (
        len(layers) == 2 and res["experts"]["image"]["tokens"] == 6 * 4
    )  # 4 tokens per picture (image + mixed)
    assert res["experts"]["audio"]["tokens"] > 0
    out = {"model": "tiny", "suite": "toy", "device": "cpu", **res}
    assert "text perplexity" in format_result(out)
    table, rows = retention_table(out, out)
    assert rows["speech"]["retention"] == pytest.approx(1.0) or speech["value"] == 0.0
    assert "retention" in table


def test_eval_cli_rejects_bad_input(tmp_path: Path) -> None:
    from omniedge.eval.cli import eval_cli, resolve_suite

    with pytest.raises(OmniedgeError):
        eval_cli(str(tmp_path / "missing"), suite=str(tmp_path))
    with pytest.raises(OmniedgeError, match="unknown suite"):
        resolve_suite(str(tmp_path / "nope"))
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    with pytest.raises(OmniedgeError, match="engine bundle"):
        eval_cli(str(tmp_path / "bundle"))


def test_eval_limit_scores_the_first_examples_of_each_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniedge.eval.cli import eval_cli

    monkeypatch.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
    root = _toy_dataset(tmp_path / "ds")
    out = eval_cli("tiny", suite=str(root), limit=2, json_path=tmp_path / "e.json")
    assert out["dataset"]["limit"] == 2
    assert {t: r["n"] for t, r in out["tasks"].items() if t != "text"} == {
        "image": 2,
        "speech": 2,
        "mixed": 2,
    }
    with pytest.raises(OmniedgeError, match="--limit 0"):
        eval_cli("tiny", suite=str(root), limit=0)


def test_retention_table_from_eval_results(tmp_path: Path) -> None:
    from omniedge.bench.retention import main, table

    def result(ppl: float, acc: float, limit: int | None = 500) -> dict[str, Any]:
        return {
            "dataset": {"content_sha256": "x", "limit": limit},
            "tasks": {
                "text": {
                    "metric": "perplexity",
                    "lower_is_better": True,
                    "value": ppl,
                    "lo": ppl - 1,
                    "hi": ppl + 1,
                },
                "image": {
                    "metric": "accuracy",
                    "lower_is_better": False,
                    "value": acc,
                    "lo": acc - 0.1,
                    "hi": acc,
                },
            },
        }

    md = table(result(60.0, 0.9), [("half", result(80.0, 0.45))])
    assert "| half | 80.0 [79.0, 81.0] | 75.0% | 45.0% [35.0, 45.0] | 50.0% |" in md
    with pytest.raises(OmniedgeError, match="other test examples"):
        table(result(60.0, 0.9), [("all", result(80.0, 0.45, limit=None))])
    (tmp_path / "t.json").write_text(json.dumps(result(60.0, 0.9)))
    assert main([str(tmp_path / "t.json"), str(tmp_path / "missing.json")]) == 2


def test_retention_sweep_names_are_recipes_the_validator_takes() -> None:
    from omniedge.bench.retention_sweep import recipe_of
    from omniedge.compress.recipe import validate_recipe

    r = recipe_of("p25-reap-global-modality+q-gptq")
    assert r["stages"][0]["prune"] == {
        "method": "reap",
        "keep_ratio": 0.75,
        "budget": "global",
        "weighting": "modality",
    }
    assert r["stages"][1]["quantize"]["method"] == "gptq" and r["calibration"]["source"] == "omni-mini-data"
    assert recipe_of("q-rtn_clip")["stages"][0]["quantize"]["clip_search"] is True
    for name in ("p50-random-uniform", "p50-router_mass-global+q-awq", "q-rtn"):
        validate_recipe(recipe_of(name))
    for bad in ("p50-foo-global", "p150-reap-uniform", "p50-reap-sideways", "q-nf4"):
        with pytest.raises(OmniedgeError):
            recipe_of(bad)


def test_a_training_pack_of_the_test_split_scores_as_the_data_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`omniedge eval --suite PACK` (a GPU machine has packs, not the data set): same examples, same scores
    where features are not quantized (text, images); audio within the pack's mel quantization."""
    from omniedge.eval.cli import eval_cli
    from omniedge.models.tiny import build_tiny
    from omniedge.training.pack import write_pack

    monkeypatch.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
    root = _toy_dataset(tmp_path / "ds")
    _, tok = build_tiny()
    pack = write_pack(
        root,
        tmp_path / "pack",
        tok,
        image_size=64,
        splits=("train", "test"),
        mel_levels=256,
        speech_texts=False,
    )
    direct = eval_cli("tiny", suite=str(root))
    packed = eval_cli("tiny", suite=str(pack))
    assert packed["dataset"]["pack"] and packed["dataset"]["split"] == "test"
    assert {t: r["n"] for t, r in packed["tasks"].items()} == {t: r["n"] for t, r in direct["tasks"].items()}
    assert packed["tasks"]["text"]["value"] == pytest.approx(direct["tasks"]["text"]["value"], rel=1e-5)
    assert packed["tasks"]["image"]["value"] == direct["tasks"]["image"]["value"]
    assert packed["tasks"]["image"]["baseline"] == direct["tasks"]["image"]["baseline"]
