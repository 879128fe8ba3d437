"""The seeded random Qwen3-Omni source, the real-format checkpoint writer, and `full-ci` through the
streaming compressor by both routes (on the fly, and written to disk then read back by the real reader)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from omniedge.compress import pipeline
from omniedge.errors import OmniedgeError
from omniedge.models.full import ci_config_dict, full_config_dict, qwen_id_tokenizer
from omniedge.random_source import RandomSource, write_checkpoint
from omniedge.weights import SafetensorsDir, fused_experts

REPO = Path(__file__).resolve().parents[1]
RECIPE = {
    "stages": [{"prune": {"keep_ratio": 0.5}}, {"quantize": {}}],
    "calibration": {"samples": 6, "max_tokens": 64, "image_size": 64, "audio_seconds": 1.0},
    "measure": {"texts": 2, "images": 1, "audios": 1, "max_tokens": 32},
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    h = tmp_path_factory.mktemp("omniedge-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(h))
        yield h


def test_full_source_has_the_real_checkpoints_tensors() -> None:
    """Names, shapes and dtype of the published checkpoint: per-expert tensors, talker and code2wav included,
    35,259,818,545 parameters; nothing is generated until asked."""
    src = RandomSource(full_config_dict())
    names = src.names()
    assert sum(torch.Size(src.shape(n)).numel() for n in names) == 35_259_818_545
    assert {src.dtype(n) for n in names} == {"BF16"}
    thinker_experts = [n for n in names if n.startswith("thinker.model.layers.") and ".mlp.experts." in n]
    assert len(thinker_experts) == 48 * 128 * 3
    assert src.shape("thinker.model.layers.47.mlp.experts.127.gate_proj.weight") == (768, 2048)
    assert src.shape("thinker.model.layers.0.mlp.experts.0.down_proj.weight") == (2048, 768)
    assert src.shape("thinker.model.layers.0.mlp.gate.weight") == (128, 2048)
    assert src.shape("thinker.lm_head.weight") == (152064, 2048)
    assert src.shape("thinker.visual.blocks.0.mlp.linear_fc1.weight") == (4304, 1152)
    assert any(n.startswith("talker.model.layers.19.mlp.experts.127.") for n in names)
    assert any(n.startswith("code2wav.") for n in names)
    assert not any("language_model" in n or "gate_up_proj" in n for n in names)  # on-disk spelling


def test_random_tensors_are_deterministic_per_seed_and_name() -> None:
    a, b = RandomSource(ci_config_dict(), seed=0), RandomSource(ci_config_dict(), seed=1)
    n = "thinker.model.layers.1.self_attn.q_proj.weight"
    x = a.get(n)
    assert x.dtype == torch.bfloat16 and tuple(x.shape) == a.shape(n)
    assert torch.equal(x, a.get(n))  # asked twice: the same values
    assert not torch.equal(x, b.get(n))  # another seed: other values
    assert not torch.equal(x, a.get("thinker.model.layers.1.self_attn.k_proj.weight")[: x.shape[0]])
    assert 0.015 < float(x.float().std()) < 0.025  # transformers' initializer_range
    assert torch.equal(
        a.get("thinker.model.layers.1.input_layernorm.weight"), torch.ones(256, dtype=torch.bfloat16)
    )


def test_written_checkpoint_is_the_real_format(tmp_path: Path) -> None:
    """The first N layers written as HF shards + index: the real reader gives back the same tensors, and
    transformers' from_pretrained loads it with no missing or unexpected key."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    cfg = ci_config_dict()
    src = RandomSource(cfg)
    out = write_checkpoint(src, cfg, qwen_id_tokenizer(cfg), tmp_path / "ck", layers=2, shard_bytes=32 << 20,
                           progress=False)  # fmt: skip
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "model-00001-of-00004.safetensors" in files
    assert (
        json.loads((out / "config.json").read_text())["thinker_config"]["text_config"]["num_hidden_layers"]
        == 2
    )
    disk = SafetensorsDir(out)
    assert not any(n.startswith("thinker.model.layers.2.") for n in disk.names())
    for n in ("thinker.model.layers.1.mlp.experts.7.up_proj.weight", "thinker.visual.blocks.2.attn.qkv.weight",
              "talker.model.layers.0.mlp.experts.3.down_proj.weight"):  # fmt: skip
        assert torch.equal(disk.get(n), src.get(n)) and disk.dtype(n) == "BF16"
    gate_up, down = fused_experts(disk, 1)
    assert tuple(gate_up.shape) == (16, 256, 256) and tuple(down.shape) == (16, 256, 128)
    _, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    (out / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(OmniedgeError, match="missing 1 shard"):
        pipeline.compress(out, tmp_path / "x", RECIPE, progress=False)


def test_full_ci_streams_through_compress_by_both_routes(home: Path, tmp_path: Path) -> None:
    """`full-ci` compressed on the fly, and its first 2 layers written to disk then compressed through the
    real reader: the same experts kept and the same INT4 bytes in those layers; talker and code2wav dropped."""
    on_the_fly = pipeline.compress("full-ci", tmp_path / "a", RECIPE, progress=False)
    cfg = ci_config_dict()
    disk = write_checkpoint(RandomSource(cfg), cfg, qwen_id_tokenizer(cfg), tmp_path / "ck", layers=2,
                            progress=False)  # fmt: skip
    from_disk = pipeline.compress(disk, tmp_path / "b", RECIPE, progress=False)
    ma, mb = (json.loads((d / "omniedge.json").read_text()) for d in (on_the_fly, from_disk))
    kept_a, kept_b = ma["stages"][0]["result"]["kept"], mb["stages"][0]["result"]["kept"]
    assert list(kept_a) == ["0", "1", "2"] and list(kept_b) == ["0", "1"]
    assert all(kept_a[k] == kept_b[k] for k in kept_b)
    a, b = SafetensorsDir(on_the_fly), SafetensorsDir(from_disk)
    packed = [n for n in b.names() if n.endswith((".qweight", ".scales"))]
    assert len(packed) == 2 * 2 * 6
    assert all(torch.equal(a.get(n), b.get(n)) for n in packed)
    cfg_out = json.loads((on_the_fly / "config.json").read_text())
    assert (
        cfg_out["enable_audio_output"] is False
        and cfg_out["thinker_config"]["text_config"]["num_experts"] == 8
    )
    assert ma["output"]["text_only"] is True and ma["output"]["dropped"] == ["talker", "code2wav"]
    assert not any(n.startswith(("talker.", "code2wav.")) for n in a.names())
    assert ma["source"]["random"] == "full-ci"
    assert sum(sum(p.values()) for p in ma["output"]["bytes"].values()) == ma["output"]["expected_bytes"]
    assert set(ma["run"]["phases"]) == {"open", "requests", "encode", "layers", "score", "finish"}
    assert ma["run"]["host_peak_rss_bytes"] > 0 and len(ma["layers"]["per_layer_seconds"]) == 3
    from omniedge.checkpoint import load_checkpoint

    model, tok = load_checkpoint(on_the_fly)  # reloads in transformers (INT4 kept packed) and generates
    ids = torch.tensor([tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n").ids])
    with torch.inference_mode():
        gen = model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                     do_sample=False)  # fmt: skip
    assert gen.shape == (1, ids.shape[1] + 4)


def _speech_works() -> bool:
    from omniedge.data import speech

    try:
        speech.synthesize("a test", speech.Voice("en-us", 160, 50, -20.0, -60.0), 0)
    except (OmniedgeError, OSError):
        return False
    return True


@pytest.mark.slow
def test_the_30b_command_at_ci_size(home: Path, tmp_path: Path) -> None:
    """Exactly the H200 command (docs/compress.md) on `full-ci` instead of `full`, fewer calibration requests."""
    if not _speech_works():
        pytest.skip("the 30B recipe's calibration pack needs speech synthesis (omniedge.data.speech)")
    out = tmp_path / "full-ci-int4"
    cmd = [sys.executable, "-m", "omniedge", "compress", "full-ci", "-o", str(out),
           "--recipe", str(REPO / "recipes" / "qwen3-omni-30b-prune50-int4.yaml"), "--samples", "24"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "omniedge.json").read_text())
    assert meta["calibration"]["requests_by_kind"] == {"text": 12, "image": 6, "audio": 6}
    assert set(meta["stages"][-1]["measured"]["by_modality"]) == {"text", "image", "audio"}
