"""omni-mini: the committed teacher (size, architecture targets, it answers on CPU), its chat-format
batches, the training pack, and a 2-step CPU smoke run of the training script."""

from __future__ import annotations

import json
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from omniedge.models.omni_mini import OMNI_MINI_DIR, corpus_texts, omni_mini_path, train_tokenizer
from omniedge.training.batches import (
    IGNORE_INDEX,
    ChatTokens,
    Example,
    audio_token_count,
    collate,
    dataset_examples,
    patchify,
    sequence,
)

MAX_BYTES = 24_000_000


# ---------------------------------------------------------------- the committed weights


def test_committed_checkpoint_meets_the_size_and_moe_targets() -> None:
    path = omni_mini_path()
    assert (path / "model.safetensors").stat().st_size <= MAX_BYTES
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["thinker_config"]["text_config"]
    assert text["num_experts"] >= 32 and text["num_experts_per_tok"] >= 4
    assert text["hidden_size"] % 128 == 0 and text["moe_intermediate_size"] % 128 == 0


# Floors on held-out data (the small data set's test split: documents, scene layouts and voices that the
# training split never has), measured by running the model here, not read back from omniedge.json.
# Measured here (2026-12-01, data builder v3) with `evaluate("omni-mini", suite="omni-mini-small", limit=32)`:
# text perplexity 50.2 (unigram 864), image accuracy 0.97 (majority 0.09), speech WER 0.018 on 12 utterances
# of held-out voices (empty 1.0; the weights before the CTC run scored 0.77).
HELD_OUT_LIMIT = 32
FLOORS = {"text_ppl_vs_unigram": 0.2, "image_accuracy": 0.8, "speech_wer": 0.3}


def test_committed_model_scores_above_floors_on_held_out_data() -> None:
    from omniedge.eval.cli import evaluate

    res = evaluate("omni-mini", suite="omni-mini-small", limit=HELD_OUT_LIMIT, progress=False)
    tasks = res["tasks"]
    text, image, speech = tasks["text"], tasks["image"], tasks["speech"]
    assert text["n"] >= 20 and image["n"] >= 20 and speech["n"] >= 10
    assert text["value"] <= FLOORS["text_ppl_vs_unigram"] * text["baseline"]["unigram"]["value"], text
    assert image["value"] >= FLOORS["image_accuracy"] > image["baseline"]["majority"]["value"], image
    assert speech["value"] <= FLOORS["speech_wer"] < speech["baseline"]["empty"]["value"], speech


def test_every_int4_weight_of_the_thinker_has_input_width_multiple_of_128() -> None:
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omniedge.models.family import moe_blocks, thinker_parts

    cfg = Qwen3OmniMoeConfig.from_pretrained(OMNI_MINI_DIR)
    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration(cfg)
    text = thinker_parts(model).text_model
    widths = [m.in_features for m in text.modules() if isinstance(m, torch.nn.Linear)]
    widths += [thinker_parts(model).lm_head.in_features]
    for _, block in moe_blocks(model):
        widths += [block.experts.gate_up_proj.shape[-1], block.experts.down_proj.shape[-1]]
    assert widths and all(w % 128 == 0 for w in widths), widths


@pytest.fixture(scope="module")
def teacher():  # type: ignore[no-untyped-def]
    from omniedge.checkpoint import load_checkpoint
    from omniedge.eval.suite import TorchPredictor

    t0 = time.perf_counter()
    model, tok = load_checkpoint(omni_mini_path())
    assert time.perf_counter() - t0 < 30
    assert next(model.parameters()).dtype.is_floating_point
    return TorchPredictor(model, tok, image_size=64)


def test_committed_model_answers_image_questions(teacher) -> None:  # type: ignore[no-untyped-def]
    from omniedge.data import scenes

    rng = np.random.default_rng(123)
    exs, refs = [], []
    tok = teacher.tokenizer
    for _ in range(12):
        layout = scenes.sample_layout(rng)
        img, _ = scenes.render(layout, rng)
        _, prompt, answer = scenes.questions(layout)[0]  # the count question
        pv, grid = patchify(np.asarray(img))
        exs.append(Example("image", tok.encode(answer).ids, tok.encode(prompt).ids, pv, grid))
        refs.append(answer)
    t0 = time.perf_counter()
    hyps = teacher.generate(exs, max_new_tokens=8)
    assert time.perf_counter() - t0 < 60
    correct = sum(h == r for h, r in zip(hyps, refs, strict=True))
    assert correct >= 9, list(zip(refs, hyps, strict=True))


def test_committed_model_listens_to_an_unseen_voice(teacher) -> None:  # type: ignore[no-untyped-def]
    """The transcript is far more likely given its own audio than given another sentence's audio.

    (omni-mini misses the WER target, see docs/omni-mini.md; this checks the audio path carries the words.)
    """
    from omniedge.data import speech
    from omniedge.training.batches import ASR_PROMPT, log_mel

    sentences = ["i do not know what you mean", "the king is in the house", "he said that it was good",
                 "come with me my lord"]  # fmt: skip
    voice = speech.Voice("en-us+m3", 170, 50, -20.0, -60.0)  # m3 is a test-split voice variant
    tok = teacher.tokenizer
    mels = [
        log_mel(speech.synthesize(s, voice, i).astype(np.float32) / 32768.0) for i, s in enumerate(sentences)
    ]
    prompt = tok.encode(ASR_PROMPT).ids

    def nll(shift: int) -> float:
        exs = [
            Example("speech", tok.encode(s).ids, prompt, mel=mels[(i + shift) % 4])
            for i, s in enumerate(sentences)
        ]
        return float(np.mean([a / c for a, c in teacher.teacher_forced(exs, None)]))

    own, swapped = nll(0), nll(1)
    assert own < swapped - 0.5, (own, swapped)
    hyps = teacher.generate([Example("speech", [], prompt, mel=m) for m in mels[:2]], max_new_tokens=24)
    assert all(h.strip() for h in hyps), hyps


# ---------------------------------------------------------------- chat format


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    texts = ["how many shapes are there? two. the cat sat on the mat.", "a red circle at the top left"] * 20
    return train_tokenizer(texts, 400)


def test_sequence_labels_only_the_answer(tok) -> None:  # type: ignore[no-untyped-def]
    ct = ChatTokens.from_tokenizer(tok)
    mel = np.zeros((128, 250), np.float32)
    pv = np.zeros((16, 1536), np.float32)
    ex = Example("mixed", tok.encode("two").ids, tok.encode("how many?").ids, pv, (1, 4, 4), mel)
    ids, labels = sequence(ct, ex)
    assert len(ids) == len(labels)
    assert ids.count(ct.image_pad) == 4 and ids.count(ct.audio_pad) == audio_token_count(250)
    labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    answer = [*tok.encode("two").ids, ct.im_end]
    assert [ids[i] for i in labelled] == answer and labelled[-1] == len(ids) - 1
    assert ids[labelled[0] - 3 : labelled[0]] == [ct.im_start, ct.assistant, *ct.newline]
    b = collate(ct, [ex, Example("text", tok.encode("the cat sat").ids)])
    assert b["input_ids"].shape == b["labels"].shape and b["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert b["input_features"].shape == (1, 128, 250) and int(b["feature_attention_mask"].sum()) == 250
    g = collate(ct, [ex, Example("text", tok.encode("the").ids)], generation=True)
    assert int(g["attention_mask"][1, 0]) == 0 and int(g["attention_mask"][1, -1]) == 1  # left padded


def test_precomputed_mrope_positions_match_transformers(tok) -> None:  # type: ignore[no-untyped-def]
    from omniedge.models.family import thinker_of
    from omniedge.models.omni_mini import build_omni_mini

    ct = ChatTokens.from_tokenizer(tok)
    rng = np.random.default_rng(0)
    exs = [
        Example("image", tok.encode("two").ids, tok.encode("how many?").ids, np.zeros((16, 1536), np.float32), (1, 4, 4)),
        Example("speech", tok.encode("a cat").ids, tok.encode("say").ids, mel=rng.normal(size=(128, 333)).astype(np.float32)),
        Example("mixed", tok.encode("top left").ids, [], np.zeros((64, 1536), np.float32), (1, 8, 8),
                rng.normal(size=(128, 150)).astype(np.float32)),
        Example("text", tok.encode("the cat sat on the mat").ids),
    ]  # fmt: skip
    b = collate(ct, exs, positions=True)
    inner = thinker_of(build_omni_mini(tok))  # get_rope_index lives here in 5.17 and 5.24
    ref, _ = inner.get_rope_index(
        b["input_ids"],
        b["image_grid_thw"],
        None,
        b["attention_mask"],
        False,
        b["feature_attention_mask"].sum(1),
        None,
    )
    mask = b["attention_mask"].bool()
    assert (ref.long()[:, mask] == b["position_ids"][:, mask]).all()
    assert int(b["position_ids"][:, 2].max()) < int(mask[2].sum())  # the 8x8 image compresses positions


def test_divergence_guard_rolls_back_and_halves_the_lr() -> None:
    import torch

    from omniedge.training.state import DivergenceGuard

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    guard = DivergenceGuard(model, opt, every=100)
    assert guard.check(1, 0.5, 2.0)
    good = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert not guard.check(2, float("nan"), 2.0)
    assert torch.equal(model.weight, good) and guard.lr_scale == 0.5 and guard.rollbacks == [2]


def test_audio_token_count_matches_transformers() -> None:
    import torch
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

    frames = torch.arange(1, 3001)
    ref = m._get_feat_extract_output_lengths(frames).tolist()
    assert [audio_token_count(int(f)) for f in frames] == ref


def test_patchify_matches_transformers_image_processor() -> None:
    try:
        from transformers import Qwen2VLImageProcessorPil as Proc
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Proc
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    p = Proc(min_pixels=64 * 64, max_pixels=64 * 64, patch_size=16, temporal_patch_size=2, merge_size=2,
             image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    ref = p(images=[img], return_tensors="np")
    pv, grid = patchify(img)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-6)


# ---------------------------------------------------------------- pack + training smoke run


def _toy_dataset(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        t = np.arange(4000 * (i + 2)) / 16000
        x = (0.2 * np.sin(2 * np.pi * (150 + 90 * i) * t) * 32767).astype(np.int16)
        with wave.open(str(root / "wav" / f"{i}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(x.tobytes())
    rows = {
        "text": [{"text": "a red circle and a blue square sit on the mat. " * (i + 3)} for i in range(4)],
        "image": [{"image": f"img/{i}.png", "prompt": "how many shapes are there?", "answer": "two", "task": "count"} for i in range(4)],
        "speech": [{"audio": f"wav/{i}.wav", "text": "a blue square", "voice": "v"} for i in range(4)],
        "mixed": [{"image": f"img/{i}.png", "audio": f"wav/{i}.wav", "prompt": "answer.", "answer": "top left", "task": "where"} for i in range(4)],
    }  # fmt: skip
    for task, rs in rows.items():
        (root / task).mkdir()
        for split in ("train", "val"):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (root / "manifest.json").write_text('{"name": "toy"}')
    return root


def test_pack_roundtrip_and_two_step_cpu_training(tmp_path: Path) -> None:
    import torch

    from omniedge.checkpoint import load_checkpoint, read_meta
    from omniedge.training.pack import load_pack_examples, read_pack_meta, write_pack
    from omniedge.training.train import Phase, TrainConfig, train

    root = _toy_dataset(tmp_path / "ds")
    tk = train_tokenizer(corpus_texts(root), 600)
    pack = write_pack(
        root, tmp_path / "pack", tk, image_size=64, splits=("train", "val"), mel_levels=16, speech_texts=False
    )  # training audio packed (the synthesised path: tests/test_training_speech.py)
    assert read_pack_meta(pack)["counts"]["speech/train"] == 4
    for task in ("image", "speech", "mixed", "text"):
        packed = load_pack_examples(pack, task, "train")
        direct = dataset_examples(tk, root, task, "train", image_size=64, max_text_len=256)
        assert len(packed) == len(direct)
        for a, b in zip(packed, direct, strict=True):
            assert a.answer == b.answer and a.prompt == b.prompt and a.reference == b.reference
            if b.pixel_values is not None:
                np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
            if b.mel is not None:
                step = (b.mel.max() - b.mel.min()) / 15
                assert a.mel.shape == b.mel.shape and np.abs(a.mel - b.mel).max() <= step / 2 + 1e-5

    joint = Phase("joint", {"text": 1, "image": 2, "speech": 2, "mixed": 1}, steps=2, warmup_steps=1)
    cfg = TrainConfig(phases=[joint], val_every=2, val_examples=2, final_eval=False, loader_workers=1)
    out = train(pack, tmp_path / "ck", cfg, "cpu")
    meta = read_meta(out)
    curve = meta["training"]["curve"]
    assert meta["training"]["settings"]["steps"] == [2]
    assert meta["training"]["settings"]["kernels"]["encoder_attention"] == "flash_blockdiag_sdpa"  # checked
    assert all(np.isfinite(v) for v in curve[-1]["val"].values()) and curve[0]["aux"] > 0
    assert curve[0]["ctc"] > 0  # packed speech has its transcript as the CTC target
    model, tok2 = load_checkpoint(out)
    assert tok2.get_vocab_size() == tk.get_vocab_size()
    assert next(model.parameters()).dtype == torch.float32
    text_cfg = model.config.thinker_config.text_config
    assert text_cfg.num_experts == 32 and text_cfg.num_experts_per_tok == 4
    assert (
        json.loads((out / "config.json").read_text())["thinker_config"]["text_config"]["router_aux_loss_coef"]
        > 0
    )
