"""The compression stage on the tiny model: recipes, calibration, pruning, INT4, measurement, the pipeline."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from omniedge.compress import pipeline
from omniedge.compress.calibration import (
    Request,
    audio_features,
    encode_request,
    image_features,
    modality_counts,
)
from omniedge.compress.calibration_builtin import render_shapes, synth_tone
from omniedge.compress.recipe import (
    DEFAULT_RECIPE,
    DEFAULT_RECIPE_PATH,
    apply_overrides,
    load_recipe,
    read_recipe_file,
    validate_recipe,
)
from omniedge.errors import OmniedgeError
from omniedge.int4 import dequantize

FAST_CALIB = {"samples": 6, "max_tokens": 96, "seed": 0, "image_size": 64, "audio_seconds": 1.0}


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private OMNIEDGE_HOME so `tiny` is built once for this session, never in the user's cache."""
    h = tmp_path_factory.mktemp("omniedge-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(h))
        yield h


@pytest.fixture(scope="session")
def tiny(home: Path) -> Path:
    from omniedge.models.registry import resolve_checkpoint

    return resolve_checkpoint("tiny")


def _load(path: Path) -> tuple[Any, Any]:
    from omniedge.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _recipe(stages: list[dict[str, Any]], **calib: Any) -> dict[str, Any]:
    return {
        "stages": stages,
        "calibration": {**FAST_CALIB, **calib},
        "measure": {"texts": 4, "images": 2, "audios": 2, "max_tokens": 64},
    }


def _multimodal_inputs(model: Any, tok: Any) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(1)
    img, _ = render_shapes(64, rng)
    tone, _ = synth_tone(1.0, rng)
    enc = encode_request(
        Request("What is in the picture and the sound?", "A shape.", img, tone), tok, model, 256
    )
    return enc.inputs


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model.thinker(**inputs, use_cache=False).logits


# ---------------------------------------------------------------- recipes


def test_default_yaml_is_the_builtin_default() -> None:
    assert validate_recipe(read_recipe_file(DEFAULT_RECIPE_PATH)) == validate_recipe(
        copy.deepcopy(DEFAULT_RECIPE)
    )
    r = load_recipe(None)
    assert r["calibration"]["source"] == "pack" and r["calibration"]["path"] is None  # the shipped pack
    assert [next(iter(s)) for s in r["stages"]] == ["prune", "quantize"]
    assert r["stages"][0]["prune"]["keep_ratio"] == 0.75 and r["stages"][0]["prune"]["method"] == "reap"
    assert r["stages"][1]["quantize"]["group_size"] == 128


def test_30b_recipes_keep_64_and_77_of_128() -> None:
    from omniedge.compress.budget import uniform_budget

    for name, keep in (("qwen3-omni-30b-prune50-int4.yaml", 64), ("qwen3-omni-30b-prune40-int4.yaml", 77)):
        r = load_recipe(DEFAULT_RECIPE_PATH.parent / name)
        assert uniform_budget(128, 8, r["stages"][0]["prune"]["keep_ratio"]) == keep
        assert r["dtype"] == "bfloat16"
    plain, head = (
        load_recipe(DEFAULT_RECIPE_PATH.parent / f"qwen3-omni-30b-prune50-int4{v}.yaml")
        for v in ("", "-head")
    )
    assert head["stages"][1]["quantize"]["targets"] == [*plain["stages"][1]["quantize"]["targets"], "lm_head"]
    head["stages"][1]["quantize"]["targets"] = plain["stages"][1]["quantize"]["targets"]
    assert head == plain  # the -head recipe differs in its lm_head target only


def test_shipped_prune50_recipe_fits_blocks_then_quantizes_with_gptq() -> None:
    r = load_recipe(DEFAULT_RECIPE_PATH.parent / "omni-mini-prune50-int4.yaml")
    prune, refit, quant = (next(iter(s.values())) for s in r["stages"])
    assert (prune["method"], prune["keep_ratio"], prune["weighting"]) == ("reap", 0.5, "max")
    assert (refit["fit"], refit["last_layer"]) == ("block", "text")
    assert (quant["method"], quant["group_size"]) == ("gptq", 128)
    assert r["calibration"]["source"] == "omni-mini-data"


def test_shipped_distill_recipe_prunes_distils_on_omni_mini_then_quantizes() -> None:
    r = load_recipe(DEFAULT_RECIPE_PATH.parent / "omni-mini-prune50-distill-int4.yaml")
    assert [next(iter(s)) for s in r["stages"]] == ["prune", "distill", "quantize"]
    assert r["stages"][1]["distill"]["data"] == "omni-mini"  # the data set's name, not a path of one machine
    assert r["stages"][2]["quantize"]["method"] == "rtn"


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        ({"stages": [{"distill": {}}]}, "distill.data: missing"),
        ({"stages": [{"smooth": {}}]}, "unknown stage 'smooth'"),
        ({"stages": [{"prune": {"keep_ratio": 0.0}}]}, "keep_ratio"),
        ({"stages": [{"prune": {"keep_ratio": 1.5}}]}, "keep_ratio"),
        ({"stages": [{"prune": {"keep_ratio": "half"}}]}, "keep_ratio"),
        ({"stages": [{"prune": {"method": "magic"}}]}, "method"),
        ({"stages": [{"quantize": {"bits": 8}}]}, "bits"),
        ({"stages": [{"quantize": {"bits": 4.0}}]}, "bits"),
        ({"stages": [{"quantize": {"group_size": 127}}]}, "group size 127 is not supported"),
        ({"stages": [{"quantize": {"group_size": 256}}]}, "group size 256 is not supported"),
        ({"stages": [{"quantize": {"group_size": True}}]}, "group size True"),
        ({"stages": [{"quantize": {"symmetric": "no"}}]}, "symmetric"),
        ({"stages": [{"quantize": {"method": "rtn", "act_order": True}}]}, "unknown field(s) ['act_order']"),
        ({"stages": [{"quantize": {"method": "gptq", "damp": 2.0}}]}, "damp"),
        ({"stages": [{"quantize": {"method": "awq", "samples": 0}}]}, "samples"),
        ({"stages": [{"prune": {"budget": "greedy"}}]}, "budget"),
        ({"stages": [{"prune": {"weighting": {"smell": 1.0}}}]}, "weighting"),
        ({"stages": [{"prune": {"multiple_of": 0}}]}, "multiple_of"),
        ({"stages": [{"quantize": {"targets": ["embeddings"]}}]}, "targets"),
        ({"stages": [{"quantize": {}}, {"prune": {}}]}, "last stage"),
        ({"stages": [{"prune": {}}, {"prune": {}}]}, "twice"),
        ({"stages": [{"reconstruct": {}}, {"prune": {}}]}, "after prune"),
        ({"stages": [{"reconstruct": {"damp": 0}}]}, "damp"),
        ({"stages": [{"reconstruct": {"damp": "strong"}}]}, "damp"),
        ({"stages": [{"reconstruct": {"sweeps": 0}}]}, "sweeps"),
        ({"stages": [{"reconstruct": {"token_weight": "loud"}}]}, "token_weight"),
        ({"stages": [{"prune": {"keep_ratio": 0.5, "colour": 1}}]}, "unknown field"),
        ({"stages": {"prune": {}}}, "expected a list"),
        ({"stages": [], "calibration": {"samples": 0}}, "samples"),
        ({"stages": [], "calibration": {"mix": {"text": 0, "image": 0, "audio": 0}}}, "zero"),
        ({"stages": [], "calibration": {"image_size": 100}}, "multiple of 32"),
        ({"stages": [], "dtype": "int8"}, "dtype"),
        ({"stages": [], "speed": "fast"}, "unknown field"),
        ({"stages": [], "measure": {"texts": 0, "images": 0, "audios": 0}}, "no held-out"),
        ({"stages": [], "output": {"text_only": False}}, "talker"),
        ({"stages": [], "calibration": {"source": "pack", "path": ""}}, "not a path"),
        ({"stages": [{"quantize": {"method": "gptq-someday"}}]}, "method"),
        (["prune"], "expected a mapping"),
    ],
)
def test_bad_recipe_is_a_clear_error(recipe: Any, needle: str) -> None:
    with pytest.raises(OmniedgeError) as e:
        validate_recipe(recipe)
    assert needle in e.value.problem
    assert e.value.fix


def test_overrides() -> None:
    r = apply_overrides(load_recipe(None), keep_ratio=0.25, quantize=False)
    assert [next(iter(s)) for s in r["stages"]] == ["prune"]
    assert r["stages"][0]["prune"]["keep_ratio"] == 0.25
    added = apply_overrides(validate_recipe({"stages": [{"quantize": {}}]}), keep_ratio=0.75)
    assert [next(iter(s)) for s in added["stages"]] == ["prune", "quantize"]
    with pytest.raises(OmniedgeError, match="keep_ratio"):
        apply_overrides(load_recipe(None), keep_ratio=2.0)


def test_recipe_files(tmp_path: Path) -> None:
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"stages": [{"prune": {"keep_ratio": 0.75}}]}))
    assert load_recipe(j)["stages"][0]["prune"]["keep_ratio"] == 0.75
    y = tmp_path / "bad.yaml"
    y.write_text("stages: [prune: {keep_ratio: 0.5}\n")
    with pytest.raises(OmniedgeError, match="not valid YAML"):
        load_recipe(y)
    with pytest.raises(OmniedgeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- calibration mix


def test_modality_counts() -> None:
    assert modality_counts(32, {"text": 0.5, "image": 0.25, "audio": 0.25}) == {
        "text": 16,
        "image": 8,
        "audio": 8,
        "image+audio": 0,
    }
    assert modality_counts(5, {"text": 1.0, "image": 0.0, "audio": 0.0}) == {
        "text": 5,
        "image": 0,
        "audio": 0,
        "image+audio": 0,
    }
    assert modality_counts(8, {"text": 0.5, "audio": 0.25, "image+audio": 0.25})["image+audio"] == 2
    assert sum(modality_counts(7, {"text": 0.5, "image": 0.25, "audio": 0.25}).values()) == 7


# ---------------------------------------------------------------- calibration


def test_features_agree_with_transformers(tiny: Path) -> None:
    """Calibration goes through the runtime's preprocessing; check it against transformers here too."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as mq

    rng = np.random.default_rng(0)
    tone, _ = synth_tone(2.3, rng)
    feats, mask, n_tok = audio_features(tone, 128, 50)
    ref = WhisperFeatureExtractor(feature_size=128)(
        tone,
        sampling_rate=16000,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert feats.shape == ref["input_features"].shape and mask.tolist() == ref["attention_mask"].tolist()
    torch.testing.assert_close(feats, ref["input_features"], atol=2e-4, rtol=0)
    assert n_tok == int(mq._get_feat_extract_output_lengths(mask.sum(-1), 50)[0]) == 30
    img, _ = render_shapes(96, rng)
    pixels, grid = image_features(img, 16, 2, 2)
    assert grid.tolist() == [[1, 6, 6]] and tuple(pixels.shape) == (36, 1536)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0


# ---------------------------------------------------------------- pruning on the model

KNOWN = {0: [1, 2, 5, 6], 1: [0, 3, 4, 7]}  # the experts each layer's router is forced to use


@pytest.fixture(scope="module")
def biased(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny model whose routers only ever pick KNOWN experts on text: embedding dim 0 is a constant that
    pushes the other experts' logits far down, dim 1 (sign = token id parity) picks the pair."""
    from omniedge.checkpoint import save_checkpoint
    from omniedge.models.family import moe_blocks, thinker_parts
    from omniedge.models.tiny import build_tiny

    model, tok = build_tiny(seed=3)
    with torch.no_grad():
        emb = thinker_parts(model).text_model.embed_tokens.weight
        even = torch.arange(emb.shape[0]) % 2 == 0
        emb[:, 0] = 30.0
        emb[:, 1] = torch.where(even, 30.0, -30.0)
        for li, block in moe_blocks(model):
            w = block.gate.weight
            for e in range(w.shape[0]):
                favoured = e in KNOWN[li]
                w[e, 0] = 0.0 if favoured else -5.0
                w[e, 1] = (5.0 if KNOWN[li].index(e) < 2 else -5.0) if favoured else 0.0
    return save_checkpoint(
        model, tok, tmp_path_factory.mktemp("biased") / "ckpt", meta={"model": "tiny-biased"}
    )


def test_pruning_keeps_the_routed_experts(biased: Path, tmp_path: Path) -> None:
    from transformers import Qwen3OmniMoeForConditionalGeneration

    out = tmp_path / "pruned"
    recipe = _recipe([{"prune": {"keep_ratio": 0.5}}], mix={"text": 1.0, "image": 0.0, "audio": 0.0})
    recipe["measure"] = {"texts": 4, "images": 0, "audios": 0}  # the routers are forced on text only
    pipeline.compress(biased, out, recipe, progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    prune = meta["stages"][0]
    assert prune["result"]["kept"] == {str(k): v for k, v in KNOWN.items()}
    assert prune["result"]["routed_share_kept"] == {"text": 1.0}
    assert prune["measured"]["kl"] < 1e-6 and prune["measured"]["top1"] == 1.0
    assert meta["calibration"]["requests_by_kind"] == {"text": 6}

    student = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    assert student.config.thinker_config.text_config.num_experts == 4
    teacher, tok = _load(biased)
    from omniedge.models.family import moe_blocks

    for (li, sb), (_, tb) in zip(moe_blocks(student), moe_blocks(teacher), strict=True):
        assert tuple(sb.gate.weight.shape) == (4, 128)
        assert tuple(sb.experts.gate_up_proj.shape) == (4, 256, 128)
        assert torch.equal(sb.experts.down_proj, tb.experts.down_proj[KNOWN[li]])
    ids = torch.tensor([tok.encode("Red circle, blue square: count the shapes.").ids])
    a = _logits(student, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    b = _logits(teacher, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # pruned experts were never routed to


@pytest.mark.parametrize("budget", ["uniform", "global"])
def test_keep_all_without_quantization_is_exact(tiny: Path, tmp_path: Path, budget: str) -> None:
    prune = {"method": "reap", "keep_ratio": 1.0, "budget": budget}
    out = pipeline.compress(tiny, tmp_path / "same", _recipe([{"prune": prune}]), progress=False)
    teacher, tok = _load(tiny)
    student, _ = _load(out)
    inputs = _multimodal_inputs(teacher, tok)
    assert torch.equal(_logits(student, inputs), _logits(teacher, inputs))
    meta = json.loads((out / "omniedge.json").read_text())
    assert meta["stages"][0]["measured"]["kl"] == 0.0
    assert not (out / "int4.safetensors").exists()


# ---------------------------------------------------------------- INT4


def test_int4_file_and_round_trip(tiny: Path, tmp_path: Path) -> None:
    from omniedge.weights import SafetensorsDir, canonical_name

    out = pipeline.compress(tiny, tmp_path / "q", _recipe([{"quantize": {}}]), progress=False)
    cfg = json.loads((out / "config.json").read_text())["omniedge_quantization"]
    assert cfg["bits"] == 4 and cfg["group_size"] == 128 and cfg["zero_point"] == 8
    assert cfg["file"] == "int4.safetensors"
    assert len(cfg["modules"]) == 12  # 2 layers x (4 attention projections + 2 fused expert tensors)
    assert cfg["in_features"] == dict.fromkeys(cfg["modules"], 128)
    assert all(n == canonical_name(n) for n in cfg["modules"])  # on-disk spelling, whatever transformers
    stored = SafetensorsDir(out)
    int4_names = sorted(n for n in stored.names() if n.endswith((".qweight", ".scales")))
    assert int4_names == sorted(f"{n}.{s}" for n in cfg["modules"] for s in ("qweight", "scales"))
    assert all(stored.file_of(n).name == "int4.safetensors" for n in int4_names)
    # No float copy of a quantized weight anywhere (fused or per expert).
    floats = [n for n in stored.names() if stored.file_of(n).name == "model.safetensors"]
    assert not [n for n in floats if n in cfg["modules"] or ".experts." in n]

    teacher, _ = _load(tiny)
    t_sd = {canonical_name(n): p for n, p in teacher.state_dict().items()}
    student, _ = _load(out)  # INT4 modules, dequantized on the fly
    s_sd = {canonical_name(n): p for n, p in student.state_dict().items()}
    for name in cfg["modules"]:
        w = t_sd[name]
        *lead, n, k = w.shape
        qw, sc = stored.get(f"{name}.qweight"), stored.get(f"{name}.scales")
        assert qw.dtype == torch.uint8 and tuple(qw.shape) == (*lead, n, -(-k // 128), 64)
        assert sc.dtype == torch.float32 and tuple(sc.shape) == (*lead, n, -(-k // 128))
        assert name not in s_sd  # the student holds the packed tensors, not a float weight
        deq = dequantize(qw, sc, k)
        step = sc.unsqueeze(-1)
        err = (w - deq).abs().reshape(*lead, n, -1, 128)
        code = w.reshape(*lead, n, -1, 128) / step
        inside = (code >= -8.5) & (code <= 7.5)  # codes [-8, 7]; beyond them the value is clamped
        assert bool(
            (err[inside] <= (step / 2).expand_as(err)[inside] + 1e-7).all()
        )  # nearest: <= half a step
        assert bool((err <= step + 1e-7).all())  # clamped (the side opposite the extreme): <= one step
        assert float(inside.float().mean()) > 0.99
        assert float((w - deq).norm() / w.norm()) < 0.15
    from omniedge.models.family import thinker_parts

    q_proj = thinker_parts(student).text_model.layers[0].self_attn.q_proj
    name = "thinker.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(
        q_proj.weight, dequantize(stored.get(f"{name}.qweight"), stored.get(f"{name}.scales"), 128)
    )
    # what is not a target stays bit-exact
    for name in ("thinker.lm_head.weight", "thinker.model.layers.0.mlp.gate.weight"):
        assert torch.equal(t_sd[name], s_sd[name])


def test_default_recipe_stays_close_to_teacher(home: Path, tiny: Path, tmp_path: Path) -> None:
    from omniedge.compress.calibration_builtin import HELDOUT_TEXTS

    out = pipeline.compress_cli("tiny", tmp_path / "default", None, None, True)
    meta = json.loads((out / "omniedge.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["prune", "quantize"]
    assert meta["stages"][0]["result"]["experts_after"] == 6
    cal = meta["calibration"]
    assert cal["requests_by_kind"] == {"text": 64, "image": 32, "audio": 32}  # the shipped pack, 128 requests
    assert cal["source"] == "pack" and meta["recipe"]["calibration"]["path"] is None
    assert all(cal["tokens"][m] > 0 for m in ("text", "image", "audio"))
    assert (
        meta["source"]["files"]["model.safetensors"]
        == json.loads((tiny / "omniedge.json").read_text())["files"]["model.safetensors"]
    )
    by = meta["stages"][-1]["measured"]["by_modality"]
    assert sorted(by) == ["audio", "image", "text"] and all(0 <= by[m]["kl"] < 0.05 for m in by)
    kl = meta["stages"][-1]["measured"]["kl"]
    print(f"tiny, default recipe (prune 8->6 + INT4 g128): KL {kl:.5f} nats/token, "
          f"top-1 {meta['stages'][-1]['measured']['top1']:.3f}")  # fmt: skip
    assert 0 < kl < 0.05
    # Recompute KL independently on the first held-out text.
    teacher, tok = _load(tiny)
    student, _ = _load(out)
    ids = torch.tensor([tok.encode(HELDOUT_TEXTS[0]).ids[:64]])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lt, ls = torch.log_softmax(_logits(teacher, kw)[0], -1), torch.log_softmax(_logits(student, kw)[0], -1)
    mine = float((lt.exp() * (lt - ls)).sum(-1).mean())
    assert 0 < mine < 0.05
    assert student.config.thinker_config.text_config.num_experts == 6


# ---------------------------------------------------------------- errors and crashes


def test_non_checkpoint_paths_are_clear_errors(home: Path, tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="not found"):
        pipeline.compress_cli(str(tmp_path / "nope"), tmp_path / "out", None, None, True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(OmniedgeError, match=r"no config\.json"):
        pipeline.compress_cli(str(tmp_path / "junk"), tmp_path / "out", None, None, True)
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_foreign_directory(tiny: Path, tmp_path: Path) -> None:
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "precious.txt").write_text("do not delete")
    with pytest.raises(OmniedgeError, match="not a previous omniedge checkpoint"):
        pipeline.compress(tiny, keep, _recipe([]), progress=False)
    assert (keep / "precious.txt").read_text() == "do not delete"
    with pytest.raises(OmniedgeError, match="is the input"):
        pipeline.compress(tiny, tiny, _recipe([]), progress=False)


def test_not_qwen3_omni_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(OmniedgeError, match="not Qwen3-Omni"):
        pipeline.compress(bad, tmp_path / "out", _recipe([]), progress=False)


def test_checkpoint_missing_tensors_fails_before_work(tiny: Path, tmp_path: Path) -> None:
    """A config that promises a layer the shards do not hold: one error naming the tensors, no output."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OmniedgeError, match=r"lacks \d+ tensor.*layers\.2\."):
        pipeline.compress(broken, tmp_path / "out", _recipe([{"quantize": {}}]), progress=False)
    assert not (tmp_path / "out").exists()


def test_disk_too_small_fails_before_work(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    from omniedge.compress import output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda _p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OmniedgeError, match="GiB free; the compressed checkpoint needs about") as e:
        pipeline.compress(tiny, tmp_path / "out", _recipe([{"quantize": {}}]), progress=False)
    assert "larger disk" in (e.value.fix or "")
    assert os.listdir(tmp_path) == []


def test_already_quantized_input_is_refused(tiny: Path, tmp_path: Path) -> None:
    q = pipeline.compress(tiny, tmp_path / "q", _recipe([{"quantize": {}}]), progress=False)
    with pytest.raises(OmniedgeError, match="already an omniedge INT4 checkpoint"):
        pipeline.compress(q, tmp_path / "qq", _recipe([{"quantize": {}}]), progress=False)


def test_other_quantized_checkpoints_are_refused(tiny: Path, tmp_path: Path) -> None:
    import shutil

    gptq = tmp_path / "gptq"
    shutil.copytree(tiny, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OmniedgeError, match="already quantized"):
        pipeline.compress(gptq, tmp_path / "out", _recipe([{"quantize": {}}]), progress=False)
    assert not (tmp_path / "out").exists()


def test_calibration_too_small_for_gptq_says_the_minimum(tiny: Path, tmp_path: Path) -> None:
    recipe = _recipe([{"quantize": {"method": "gptq"}}], samples=2, max_tokens=16)
    recipe["calibration"]["mix"] = {"text": 1.0}
    with pytest.raises(OmniedgeError, match=r"calibration too small for GPTQ: \d+ calibration tokens") as e:
        pipeline.compress(tiny, tmp_path / "out", recipe, progress=False)
    assert "at least 128" in e.value.problem and "samples" in (e.value.fix or "")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "prune",
    [
        {"keep_ratio": 0.1},
        {"keep_ratio": 0.5, "budget": "global", "min_keep": 1},
        {"keep_ratio": 0.2, "budget": "global"},
    ],
)
def test_impossible_budget_fails_before_calibrating(
    tiny: Path, tmp_path: Path, prune: dict[str, Any]
) -> None:
    with pytest.raises(OmniedgeError, match=r"fewer than the 2|per-layer floor"):
        pipeline.compress(tiny, tmp_path / "out", _recipe([{"prune": prune}]), progress=False)
    assert os.listdir(tmp_path) == []  # nothing written


def test_interrupted_run_leaves_nothing(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omniedge.compress import output

    out = tmp_path / "out"
    recipe = _recipe([{"prune": {"keep_ratio": 0.5}}, {"quantize": {}}])

    def crash(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("power cut while writing the last shard")

    monkeypatch.setattr(output.CheckpointWriter, "close", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        pipeline.compress(tiny, out, recipe, progress=False)
    assert os.listdir(tmp_path) == []  # no output, no half-written temporary directory


def test_omni_mini_data_calibration_source_draws_real_training_rows() -> None:
    """The data-set source gives text, image and speech requests from the train split (small set)."""
    import numpy as np

    pytest.importorskip("soundfile")
    from omniedge.compress.calibration import get_source
    from omniedge.compress.calibration_data import ASR_PROMPT, MIXED_PROMPT
    from omniedge.data.build import build_dataset, load_split

    source = get_source("omni-mini-data-small")
    rng = np.random.default_rng(0)
    text = source("text", 3, {}, rng, "calibration")
    images = source("image", 2, {}, rng, "calibration")
    audio = source("audio", 2, {}, rng, "calibration")
    train_texts = {r["text"][:1200] for r in load_split(build_dataset(size="small"), "text", "train")}
    assert all(r.reply in train_texts and r.image is None for r in text)
    assert all(r.image is not None and r.image.dtype == np.uint8 and r.image.ndim == 3 for r in images)
    assert all(r.prompt == ASR_PROMPT and r.audio is not None and r.audio.size > 8000 for r in audio)
    assert {r.kind for r in images} == {"image"} and {r.kind for r in audio} == {"audio"}
    spoken = source("image+audio", 2, {}, rng, "calibration")  # spoken questions about an image
    assert {r.kind for r in spoken} == {"image+audio"}
    assert all(r.prompt == MIXED_PROMPT and r.audio.size > 8000 and r.image.ndim == 3 for r in spoken)


def test_a_source_without_a_request_kind_says_so() -> None:
    from omniedge.compress.calibration import build_requests

    settings = validate_recipe({"stages": []})["calibration"]  # the builtin source
    with pytest.raises(OmniedgeError, match=r"no image\+audio requests") as e:
        build_requests(settings, {"text": 1, "image+audio": 1}, "calibration")
    assert "mix image+audio to 0" in (e.value.fix or "")


def test_report_shows_each_layer(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`omniedge compress CKPT --report`: one row per decoder layer with the experts kept, the routed share,
    the saliency spread, each weight's reconstruction error and the layer's output error per stage."""
    from omniedge.cli import main

    recipe = _recipe([{"prune": {"method": "reap", "keep_ratio": 0.5}}, {"quantize": {"method": "awq"}}])
    out = pipeline.compress(tiny, tmp_path / "r", recipe, progress=False)
    layers = json.loads((out / "omniedge.json").read_text())["layers"]["report"]
    assert [r["layer"] for r in layers] == [0, 1]
    for r in layers:
        assert r["prune"]["experts"] == 4 and len(r["prune"]["kept"]) == 4
        assert 0.5 <= r["prune"]["saliency"]["kept_share"] <= 1.0  # the best half holds at least half
        assert set(r["quantize"]) == {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {
            "mlp.experts.gate_up_proj",
            "mlp.experts.down_proj",
        }
        assert all(0 < v["error"] < 0.1 for v in r["quantize"].values())
        assert r["output_error"]["prune"] > 0 and 0 < r["output_error"]["quantize"] < 1
    saved = torch.load(out / pipeline.STATS_FILE, weights_only=True)["saliency"]
    assert saved["method"] == "reap" and set(saved["layers"]) == {0, 1}
    for li, scores in saved["layers"].items():  # the kept experts are the best by the stored scores
        best = sorted(torch.argsort(scores["overall"], descending=True)[:4].tolist())
        assert best == layers[li]["prune"]["kept"] and {"text", "image", "audio"} <= set(scores)
    capsys.readouterr()
    assert main(["compress", str(out), "--report"]) == 0
    text = capsys.readouterr().out
    assert "saliency" in text and "gate_up" in text and "reap" in text
    assert main(["compress", "tiny"]) == 2
    assert "-o OUT" in capsys.readouterr().err
    assert main(["compress", str(tiny), "--report"]) == 2  # not made by omniedge compress
    assert "no per-layer compression report" in capsys.readouterr().err


def test_a_non_uniformly_pruned_checkpoint_quantizes_and_refuses_a_second_prune(
    tiny: Path, tmp_path: Path
) -> None:
    """prune (global budget) -> float checkpoint -> quantize in a second pass: the distillation's
    `--int4 after` path for a student with a different expert count per layer."""
    from omniedge.int4_modules import experts_per_layer

    prune = {"method": "frequency", "keep_ratio": 0.5, "budget": "global", "min_keep": 2}
    pruned = pipeline.compress(tiny, tmp_path / "p", _recipe([{"prune": prune}]), progress=False)
    counts = experts_per_layer(
        json.loads((pruned / "config.json").read_text())["thinker_config"]["text_config"]
    )
    assert counts is not None and len(set(counts)) > 1  # the case under test: layers differ
    out = pipeline.compress(pruned, tmp_path / "q", _recipe([{"quantize": {}}]), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert experts_per_layer(cfg["thinker_config"]["text_config"]) == counts
    from omniedge.checkpoint import load_checkpoint
    from omniedge.weights import canonical_name

    float_model, tok = _load(pruned)
    deq, _ = load_checkpoint(out, dequantize=True)  # every INT4 weight as float, the rest as stored
    f_sd = {canonical_name(n): p for n, p in float_model.state_dict().items()}
    d_sd = {canonical_name(n): p for n, p in deq.state_dict().items()}
    assert f_sd.keys() == d_sd.keys()
    quantized = set(cfg["omniedge_quantization"]["modules"])
    assert any(".experts." in n for n in quantized)
    for name, w in f_sd.items():
        if name in quantized:  # RTN of this very weight: small relative error, same shape per layer
            assert d_sd[name].shape == w.shape and float((w - d_sd[name]).norm() / w.norm()) < 0.15
        else:
            assert torch.equal(d_sd[name], w), name
    b = _logits(_load(out)[0], _multimodal_inputs(float_model, tok))
    assert torch.isfinite(b).all()
    with pytest.raises(OmniedgeError, match="already pruned to different expert counts"):
        pipeline.compress(pruned, tmp_path / "again", _recipe([{"prune": prune}]), progress=False)
    assert not (tmp_path / "again").exists()
