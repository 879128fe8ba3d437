"""Speech for training made while training (voices, texts, features), the CTC loss on the audio encoder,
training in phases that stop and go on, and the shipped model hearing held-out utterances."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from omniedge.data import espeak, speech
from omniedge.data.speech_corpus import PROBE_SENTENCES, held_out_texts, read_lines, training_texts
from omniedge.data.speech_stream import STREAM_VARIANTS, sample_voice, utterance
from omniedge.errors import OmniedgeError
from omniedge.training.batches import ChatTokens, Example, audio_token_count, collate

needs_espeak = pytest.mark.skipif(not espeak.available(), reason="espeakng-loader is not installed")
TINY_AUDIO = dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128,
                  downsample_hidden_size=8)  # fmt: skip


# ---------------------------------------------------------------- voices and texts kept apart


def test_training_voices_never_include_a_held_out_voice() -> None:
    held = set(speech.VARIANTS["val"]) | set(speech.VARIANTS["test"])
    assert not held & set(STREAM_VARIANTS)
    bases = {v.rstrip("0123456789") for v in held} - {"m", "f", "klatt"}  # numbered families, as the dataset
    assert not [v for v in STREAM_VARIANTS if v.rstrip("0123456789") in bases]  # no iven2..4 for iven
    assert set(speech.VARIANTS["train"]) <= set(STREAM_VARIANTS) and len(STREAM_VARIANTS) >= 60
    rng = np.random.default_rng(0)
    drawn = [sample_voice(rng) for _ in range(3000)]
    assert {d.voice.split("+")[1] for d in drawn} == set(STREAM_VARIANTS)
    test_speed, test_pitch = speech.RANGES["test"]["speed"], speech.RANGES["test"]["pitch"]
    assert min(d.speed for d in drawn) <= test_speed[0] and max(d.speed for d in drawn) >= test_speed[1]
    assert min(d.pitch for d in drawn) <= test_pitch[0] and max(d.pitch for d in drawn) >= test_pitch[1]


@needs_espeak
def test_every_training_voice_is_installed_and_speaks() -> None:
    assert set(STREAM_VARIANTS) <= espeak.variants()
    for variant in STREAM_VARIANTS[::7]:
        x = speech.speak_16k("the king is in the house", f"en-gb+{variant}", 170, 50)
        assert 0.6 < len(x) / speech.SAMPLE_RATE < 4.0 and np.abs(x).max() > 0.01, variant


def test_training_texts_leave_out_held_out_sentences_and_clauses() -> None:
    train_docs = [
        "The king is in the house. Peace be with you, my good lord.",
        "I will go to the house; you will keep the house, my lord.",
        "Come with me, my good lord, and see the king.",
    ]
    val_docs = ["Where is the king? Come with me."]
    held = held_out_texts(val_docs, ["the king is in the house"])
    assert {"where is the king", "come with me", "the king is in the house"} <= held
    assert set(PROBE_SENTENCES) <= held
    sentences, words = training_texts(train_docs, held, vocab_size=50)
    assert "the king is in the house" not in sentences  # a held-out utterance
    assert "peace be with you" not in sentences  # a probe sentence of the behaviour test
    assert "you will keep the house" not in sentences  # ditto, as a clause
    assert "my good lord" in sentences and "i will go to the house" in sentences  # clauses of 3+ words
    assert "and see the king" in sentences and len(sentences) == len(set(sentences))
    assert words[0] == "the" and not (set(sentences) & held)


@needs_espeak
def test_stream_utterances_vary_and_say_only_training_texts() -> None:
    from tokenizers import Tokenizer

    from omniedge.models.omni_mini import OMNI_MINI_DIR
    from omniedge.training.synth import SpeechMaker

    tok = Tokenizer.from_file(str(OMNI_MINI_DIR / "tokenizer.json"))
    sentences = ["the king is in the house", "come with me my lord", "what is the matter"]
    words = ["king", "house", "lord", "matter", "come"]
    held = {"king house", "lord"}
    maker = SpeechMaker(tok, sentences, words, held)
    rng = np.random.default_rng(0)
    exs = [maker.speech(rng, words_fraction=0.5) for _ in range(24)]
    said = [ex.reference for ex in exs]
    assert not set(said) & held
    assert all(s in sentences or set(s.split()) <= set(words) for s in said)
    assert sum(s not in sentences for s in said) >= 6  # the curriculum's random words
    for ex in exs:
        assert ex.answer == tok.encode(ex.reference).ids
        assert ex.spoken == tok.encode(" " + ex.reference).ids  # each word one token wherever it stands
        assert ex.mel is not None and ex.mel.shape[0] == 128 and ex.mel.dtype == np.float32
    same = [ex.mel for ex in exs if ex.reference == sentences[0]]
    assert len(same) >= 2 and (same[0].shape != same[1].shape or not np.allclose(same[0], same[1]))
    a, va = utterance("come with me my lord", np.random.default_rng(1))
    b, vb = utterance("come with me my lord", np.random.default_rng(1))
    assert va == vb and np.array_equal(a, b)  # deterministic for a seed


def test_spoken_question_kinds_weighted_as_asked_and_bad_weights_named() -> None:
    from omniedge.training.synth import mixed_kind_probabilities

    kinds = ["where", "colour", "colour", "shape", "count", "where"]
    assert mixed_kind_probabilities(kinds, None) is None  # uniform over rows, as without weights
    p = mixed_kind_probabilities(kinds, {"where": 3})
    assert p is not None and abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(p, np.array([3, 1, 1, 1, 1, 3]) / 10)  # unlisted kinds weigh 1
    drawn = np.random.default_rng(0).choice(len(kinds), 6000, p=p)
    share = np.isin(drawn, [0, 5]).mean()
    assert abs(share - 6 / 10) < 0.03  # two rows of weight 3 among four of weight 1
    with pytest.raises(OmniedgeError, match="kind 'describe' is not one of"):
        mixed_kind_probabilities(kinds, {"describe": 2})
    for bad in (0, -1, float("nan"), "3"):
        with pytest.raises(OmniedgeError, match="not a positive number"):
            mixed_kind_probabilities(kinds, {"where": bad})


def test_noise_colours_and_rooms() -> None:
    from omniedge.data.speech_stream import coloured_noise, room_impulse

    rng = np.random.default_rng(0)
    f = np.fft.rfftfreq(2**15, 1 / 16000)
    lo, hi = (f > 100) & (f < 200), (f > 3200) & (f < 6400)  # five octaves apart
    for colour, slope in (("white", 0.0), ("pink", -3.0), ("brown", -6.0)):
        x = coloured_noise(2**15, colour, rng)
        p = np.abs(np.fft.rfft(x)) ** 2
        assert abs(float(np.sqrt(np.mean(x**2))) - 1) < 1e-6
        assert abs(10 * np.log10(p[hi].mean() / p[lo].mean()) / 5 - slope) < 0.7, colour
    h = room_impulse(0.4, rng)
    assert h[0] == 1.0 and len(h) == 6400
    energy = np.cumsum(h[1:][::-1] ** 2)[::-1]  # Schroeder decay of the tail
    assert 10 * np.log10(energy[int(0.3 * 16000)] / energy[40]) < -30


def test_fast_log_mel_equals_the_runtime_log_mel() -> None:
    from omniedge.runtime.preprocess import log_mel
    from omniedge.training.synth import log_mel_fast

    rng = np.random.default_rng(0)
    t = np.arange(25_000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * np.exp(-t) + 0.01 * rng.standard_normal(t.size)) * 32767
    audio = x.astype(np.int16)
    ref = log_mel(audio.astype(np.float32) / 32768.0)
    got = log_mel_fast(audio)
    assert got.shape == ref.shape == (128, 25_000 // 160)
    np.testing.assert_allclose(got, ref, atol=2e-5)


# ---------------------------------------------------------------- CTC


def test_ctc_loss_prefers_the_spoken_tokens_and_greedy_reads_them() -> None:
    import torch

    from omniedge.training.losses import ctc_greedy, ctc_loss

    vocab, width = 10, 16
    head = torch.nn.Linear(width, vocab + 1)
    counts = [6, 4]
    # hidden states that point straight at classes: tokens 3 3 blank 5 blank blank | 7 blank 7 2
    path = [[3, 3, vocab, 5, vocab, vocab], [7, vocab, 7, 2]]
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab + 1, width) * 8)
        head.bias.zero_()
    hidden = torch.cat([torch.eye(vocab + 1, width)[p] for p in path])
    assert ctc_greedy(head, hidden, counts) == [[3, 5], [7, 7, 2]]
    right = ctc_loss(head, hidden, counts, torch.tensor([3, 5, 7, 7, 2]), torch.tensor([2, 3]))
    wrong = ctc_loss(head, hidden, counts, torch.tensor([4, 5, 1, 7, 2]), torch.tensor([2, 3]))
    assert float(right.detach()) < 0.1 < float(wrong.detach())
    with torch.no_grad():  # an audio whose words are unknown (target length 0) is left out
        skip = ctc_loss(head, hidden, counts, torch.tensor([3, 5]), torch.tensor([2, 0]))
        alone = ctc_loss(head, hidden[:6], counts[:1], torch.tensor([3, 5]), torch.tensor([2]))
    assert abs(float(skip) - float(alone)) < 1e-6


def test_collate_carries_ctc_targets_in_audio_order() -> None:
    from omniedge.models.omni_mini import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat. how many?"] * 20, 300)
    ct = ChatTokens.from_tokenizer(tok)
    mel = np.zeros((128, 230), np.float32)
    exs = [
        Example("text", tok.encode("the cat").ids),
        Example("speech", [5], [6], mel=mel, spoken=[1, 2, 3]),
        Example("mixed", [5], [6], np.zeros((16, 1536), np.float32), (1, 4, 4), mel[:, :120], spoken=[4]),
        Example("speech", [5], [6], mel=mel[:, :90]),  # audio whose words are unknown
    ]
    b = collate(ct, exs, ctc=True)
    assert b["ctc_targets"].tolist() == [1, 2, 3, 4] and b["ctc_target_lengths"].tolist() == [3, 1, 0]
    from omniedge.training.losses import token_counts

    assert token_counts(b["feature_attention_mask"]) == [audio_token_count(n) for n in (230, 120, 90)]
    assert "ctc_targets" not in collate(ct, exs)


# ---------------------------------------------------------------- phases that stop and go on


CPU_STEPS = 500
SMALL_AUDIO = dict(d_model=96, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=192,
                   downsample_hidden_size=12)  # fmt: skip
VAL_WORDS = [
    "red",
    "blue house",
    "green circle",
    "square water king",
    "king",
    "house red",
    "water",
    "circle blue",
]


def _speech_pack(tmp: Path, words: list[str], n_docs: int = 40, val_speech: Sequence[str] = ()) -> Path:
    """A pack from a toy dataset: scenes, text made of `words` (so speech says only those), and val
    speech saying `val_speech` in the test split's voices."""
    import wave

    from PIL import Image

    from omniedge.models.omni_mini import corpus_texts, train_tokenizer
    from omniedge.training.pack import write_pack

    root = tmp / "ds"
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    docs = [
        ". ".join(" ".join(rng.choice(words, 3, replace=False)) for _ in range(4)) + "."
        for _ in range(n_docs)
    ]
    rows = {
        ("text", "train"): [{"text": d} for d in docs],
        ("text", "val"): [{"text": "a new document."}],
        ("image", "train"): [{"image": f"img/{i}.png", "prompt": q, "answer": a, "task": k}
                             for i in range(3) for q, a, k in (("how many shapes are there?", "two", "count"),
                                                               ("what colour is the circle?", "red", "colour"))],
        ("image", "val"): [{"image": "img/0.png", "prompt": "how many shapes are there?", "answer": "two", "task": "count"}],
    }  # fmt: skip
    (root / "wav").mkdir()
    rows[("speech", "val")] = []
    for i, text in enumerate(val_speech):
        variant = speech.VARIANTS["test"][i % len(speech.VARIANTS["test"])]
        x = speech.synthesize(text, speech.Voice(f"en-us+{variant}", 160, 50, -20.0, -60.0), i)
        with wave.open(str(root / "wav" / f"{i}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(x.tobytes())
        rows[("speech", "val")].append({"audio": f"wav/{i}.wav", "text": text, "voice": variant})
    for (task, split), rs in rows.items():
        (root / task).mkdir(exist_ok=True)
        (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    (root / "manifest.json").write_text('{"name": "toy"}')
    tok = train_tokenizer([*corpus_texts(root), *words, "answer the spoken question about the image."], 500)
    return write_pack(root, tmp / "pack", tok, image_size=64, splits=("train", "val"))


@needs_espeak
def test_training_stops_and_goes_on_across_calls(tmp_path: Path) -> None:
    from omniedge.checkpoint import read_meta
    from omniedge.training.state import load_state
    from omniedge.training.train import Phase, TrainConfig, train

    pack = _speech_pack(tmp_path, ["red", "blue", "green", "circle", "square", "house", "water"])
    meta = json.loads((pack / "pack.json").read_text())
    assert meta["speech_texts"]["sentences"] > 20 and "speech/train" not in meta["counts"]
    assert not set(read_lines(pack / "speech_sentences.txt.xz")) & set(
        read_lines(pack / "speech_held_out.txt.xz")
    )
    cfg = TrainConfig(
        phases=[Phase("encoder", {"speech": 4}, steps=3, warmup_steps=1, ctc_weight=1.0, lm=False, words_fraction=(1.0, 0.0), curriculum_steps=2),
                Phase("joint", {"text": 1, "image": 1, "speech": 1, "mixed": 1}, steps=1, warmup_steps=1)],
        val_every=100, val_examples=2, final_eval=False, loader_workers=0, audio_encoder=TINY_AUDIO,
    )  # fmt: skip
    state, out = tmp_path / "state", tmp_path / "ck"
    assert train(pack, out, cfg, "cpu", state_dir=state, stop_after=2) is None
    st, tensors = load_state(state)  # type: ignore[misc]
    assert (st.phase, st.step, st.totals) == (0, 2, [3, 1]) and "opt" in tensors and not out.exists()
    assert st.curve and all(np.isfinite(r["ctc"]) for r in st.curve if "ctc" in r)
    other = TrainConfig(**{**cfg.__dict__, "seed": 1})
    with pytest.raises(OmniedgeError, match="other settings"):
        train(pack, out, other, "cpu", state_dir=state)
    assert train(pack, out, cfg, "cpu", state_dir=state) == out
    training = read_meta(out)["training"]
    segments = [(s["phase"], s["first_step"], s["last_step"]) for s in training["segments"]]
    assert segments == [("encoder", 0, 2), ("encoder", 2, 3), ("joint", 0, 1)]
    assert training["settings"]["steps"] == [3, 1]
    curve = [r for r in training["curve"] if "ctc" in r]
    assert curve and all(np.isfinite(r["ctc"]) for r in curve)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("ctc" in k for k in names)  # the CTC head is not part of the model


# ---------------------------------------------------------------- the shipped model


@needs_espeak
def test_shipped_model_transcribes_held_out_utterances() -> None:
    """Test-split sentences (never spoken in training: PROBE_SENTENCES) by the test split's voices."""
    from omniedge.checkpoint import load_checkpoint
    from omniedge.eval.metrics import word_error_rate
    from omniedge.eval.suite import TorchPredictor
    from omniedge.models.omni_mini import omni_mini_path
    from omniedge.training.batches import ASR_PROMPT, log_mel

    model, tok = load_checkpoint(omni_mini_path())
    teacher = TorchPredictor(model, tok, image_size=64)
    prompt = tok.encode(ASR_PROMPT).ids
    voices = [f"{a}+{v}" for a, v in zip(speech.ACCENTS, speech.VARIANTS["test"] * 2, strict=False)]
    exs = []
    for i, text in enumerate(PROBE_SENTENCES):
        v = speech.Voice(voices[i % len(voices)], 150 + 10 * i, 30 + 8 * i, -20.0, -55.0)
        exs.append(Example("speech", [], prompt, mel=log_mel(speech.synthesize(text, v, i) / 32768.0)))
    hyps = teacher.generate(exs, max_new_tokens=24)
    wer = word_error_rate(list(PROBE_SENTENCES), hyps)
    right = sum(h.strip() == r for h, r in zip(hyps, PROBE_SENTENCES, strict=True))
    assert wer.value <= 0.3 and right >= 3, list(zip(PROBE_SENTENCES, hyps, strict=True))


@needs_espeak
@pytest.mark.slow
def test_ctc_training_on_cpu_learns_to_hear_words(tmp_path: Path) -> None:
    """A short CPU run of the encoder phase (a small encoder, eight words, the production speech stream
    without SpecAugment, a constant learning rate after warmup) transcribes those words, spoken by
    held-out voices, better than chance: the curve's validation CTC word error rate (an empty or random
    transcript scores ~1.0). ~15-25 min on a 2-core CPU."""
    from omniedge.checkpoint import read_meta
    from omniedge.training.train import Phase, TrainConfig, train

    words = ["red", "blue", "green", "circle", "square", "house", "water", "king"]
    pack_dir = tmp_path / "p"
    pack_dir.mkdir()
    pack = _speech_pack(pack_dir, words, val_speech=VAL_WORDS)
    cfg = TrainConfig(
        phases=[Phase("encoder", {"speech": 16}, steps=CPU_STEPS, lr=3e-3, warmup_steps=20, ctc_weight=1.0,
                      lm=False, words_fraction=(1.0, 1.0))],
        val_every=CPU_STEPS // 5, val_examples=len(VAL_WORDS), final_eval=False, loader_workers=1,
        spec_augment=False, min_lr_ratio=1.0, audio_encoder=SMALL_AUDIO,
    )  # fmt: skip
    curve = read_meta(train(pack, tmp_path / "ck", cfg, "cpu"))["training"]["curve"]
    val = [r["val"]["ctc_wer"] for r in curve if "val" in r]
    ctc = [r["ctc"] for r in curve if "ctc" in r]
    assert ctc[-1] < 0.8 * ctc[0], ctc
    assert val[-1] <= 0.8, val


@needs_espeak
def test_espeak_payload_speaks_from_where_it_is_unpacked(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tarfile

    from omniedge.data.espeak_payload import make_payload

    tarball = make_payload(tmp_path / "espeakng_loader-en.tar.xz")
    assert tarball.stat().st_size < 2_000_000
    site = tmp_path / "site"
    with tarfile.open(tarball) as tar:
        tar.extractall(site, filter="data")
    assert not [p for p in site.rglob("*_dict") if p.name != "en_dict"]
    code = ("import espeakng_loader, sys; from omniedge.data import speech; "
            "assert espeakng_loader.__file__.startswith(sys.argv[1]), espeakng_loader.__file__; "
            "x = speech.speak_16k('hello there', 'en-gb-scotland+m3'); assert len(x) > 8000")  # fmt: skip
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code, str(site)], check=True, env=env, timeout=120)
