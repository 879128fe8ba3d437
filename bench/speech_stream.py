"""How fast the training's speech stream is, and how varied: one process making the batches of each
training phase from a pack (omniedge.training.stream with its SpeechMaker), on this machine.

    python -m omniedge.bench.speech_stream PACK_DIR [--batches 3] [--json out.json]

Reports per phase: CPU and wall seconds per batch, synthesised utterances and audio seconds per CPU
second (one core; torch on one thread as in the DataLoader workers),
and over all utterances made: the share of distinct texts and of distinct (text, voice) pairs. The
training's steps need (utterances per step) / (utterances per second per process) processes to keep up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def measure(pack: Path, batches: int, seed: int = 0) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    from omniedge.training.batches import ChatTokens
    from omniedge.training.pack import load_pack_examples
    from omniedge.training.stream import StreamSpec, draw_batch
    from omniedge.training.synth import SpeechMaker, read_speech_texts
    from omniedge.training.train import default_phases

    torch.set_num_threads(1)  # as in the training's batch-making processes (torch's DataLoader workers)
    tok = Tokenizer.from_file(str(pack / "tokenizer.json"))
    ct = ChatTokens.from_tokenizer(tok)
    data = {t: load_pack_examples(pack, t, "train") for t in ("text", "image")}
    sentences, words, held = read_speech_texts(pack)
    maker = SpeechMaker(tok, sentences, words, held, data["image"])
    rng = np.random.default_rng(seed)
    draw_batch(ct, data, StreamSpec({"speech": 2}), rng, maker)  # warm up (imports, filter bank)
    out: dict[str, Any] = {"sentences": len(sentences), "phases": {}}
    said: list[str] = []
    for phase in default_phases():
        spec = StreamSpec(phase.batch, phase.words_fraction, phase.curriculum_steps)
        utts = spec.batch.get("speech", 0) + spec.batch.get("mixed", 0)
        t0, c0 = time.perf_counter(), time.process_time()
        frames = 0
        for i in range(batches):
            b = draw_batch(ct, data, spec, rng, maker, step=i * 50)
            frames += int(b["feature_attention_mask"].sum())
        wall = (time.perf_counter() - t0) / batches
        dt = (time.process_time() - c0) / batches  # CPU time: this machine's cores are shared
        audio_s = frames / batches / 100.0
        out["phases"][phase.name] = {
            "batch": spec.batch,
            "cpu_seconds_per_batch": round(dt, 3),
            "wall_seconds_per_batch": round(wall, 3),
            "utterances_per_s": round(utts / dt, 1),
            "audio_s_per_s": round(audio_s / dt, 1),
            "mean_utterance_s": round(audio_s / utts, 2),
        }
    for _ in range(400):  # distinctness of what the stream says, and in which voice
        text = maker.text(rng, 0.15)
        said.append(text)
    from omniedge.data.speech_stream import sample_voice

    pairs = {(t, sample_voice(rng).voice) for t in said}
    out["distinct_texts_share"] = round(len(set(said)) / len(said), 3)
    out["distinct_text_voice_share"] = round(len(pairs) / len(said), 3)
    import os

    out["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1),  # a shared machine: wall times stretch with it
        "python": platform.python_version(),
    }
    return out


def label_rates(pack: Path, n: int = 150, seed: int = 0) -> dict[str, Any]:
    """Why CTC over BPE: labels per second of speech against the encoder's 13 tokens per second.

    `n` training sentences spoken at 120 / 175 / 230 words per minute (the training's range) by training
    voices; an utterance is infeasible for CTC when its labels plus repeated neighbours outnumber the
    audio tokens (characters with spaces, or the CTC targets' BPE tokens).
    """
    from tokenizers import Tokenizer

    from omniedge.data import speech
    from omniedge.training.batches import audio_token_count
    from omniedge.training.synth import ctc_target, read_speech_texts

    tok = Tokenizer.from_file(str(pack / "tokenizer.json"))
    sentences = read_speech_texts(pack)[0]
    rng = np.random.default_rng(seed)
    pick = [sentences[int(i)] for i in rng.choice(len(sentences), n, replace=False)]

    def need(labels: list[Any]) -> int:
        return len(labels) + sum(a == b for a, b in itertools.pairwise(labels))

    out: dict[str, Any] = {}
    for wpm in (120, 175, 230):
        rows = []
        for i, s in enumerate(pick):
            x = speech.speak_16k(s, f"en-us+{speech.VARIANTS['train'][i % 24]}", wpm, 50)
            v = np.flatnonzero(np.abs(x) > 1e-3)
            x = x[max(0, v[0] - 1600) : v[-1] + 1600]  # 100 ms margins, as the dataset's utterances
            tokens, sec, ids = audio_token_count(len(x) // 160), len(x) / 16000, ctc_target(tok, s)
            rows.append((len(s) / sec, len(ids) / sec, need(list(s)) > tokens, need(ids) > tokens))
        a = np.array(rows, dtype=np.float64)
        out[str(wpm)] = {
            "chars_per_s": round(float(a[:, 0].mean()), 1),
            "bpe_per_s": round(float(a[:, 1].mean()), 1),
            "char_ctc_infeasible_share": round(float(a[:, 2].mean()), 3),
            "bpe_ctc_infeasible_share": round(float(a[:, 3].mean()), 3),
        }
    out["bpe_tokens_per_word"] = round(
        float(np.mean([len(ctc_target(tok, s)) / len(s.split()) for s in sentences[:5000]])), 2
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pack", type=Path)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    res = {"command": "python -m omniedge.bench.speech_stream " + " ".join(sys.argv[1:]),
           **measure(a.pack, a.batches), "ctc_label_rates": label_rates(a.pack)}  # fmt: skip
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
