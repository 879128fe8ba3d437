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
import json
import platform
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
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pack", type=Path)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    res = measure(a.pack, a.batches)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
