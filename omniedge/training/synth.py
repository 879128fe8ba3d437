"""Speech and spoken-question examples made while training, in the batch-making processes.

Speech: a training sentence or clause of the pack's list (omniedge.data.speech_corpus), or, with the
curriculum's probability, a string of 1-5 random vocabulary words (no language model can guess those, so
the audio must be heard), spoken by a random training voice with noise and reverberation
(omniedge.data.speech_stream). Mixed: a count / colour / shape / where question about a training scene,
spoken the same way. Every example carries the token ids of what its audio says (`spoken`), the target of
the CTC loss on the audio encoder. Features are the runtime's Whisper log-mel, computed with torch.stft
(float32; equal to omniedge.runtime.preprocess.log_mel within 2e-5 and ~5x faster on one thread; tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.data.build import MIXED_TASKS as MIXED_KINDS
from omniedge.prompts import MIXED_PROMPT
from omniedge.training.batches import ASR_PROMPT, HOP_LENGTH, N_MELS, SAMPLING_RATE, Example

WORD_STRING = (1, 5)  # words in a random-word utterance
WORD_POOL = 2000  # random words come from this many most frequent training words (the test's vocabulary)
SENTENCES, WORDS, HELD_OUT = "speech_sentences.txt.xz", "speech_words.txt.xz", "speech_held_out.txt.xz"


@cache
def _mel_constants() -> tuple[Any, Any]:
    import torch

    from omniedge.runtime.preprocess import mel_filter_bank

    bank = mel_filter_bank(N_MELS, 400, SAMPLING_RATE, 0.0, SAMPLING_RATE / 2).astype(np.float32)
    return torch.hann_window(400), torch.from_numpy(bank)


def log_mel_fast(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel [128, len // 160] of int16 (or float in [-1, 1]) 16 kHz audio, by torch.stft."""
    import torch

    x = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
    window, bank = _mel_constants()
    spec = torch.stft(
        torch.from_numpy(x),
        400,
        HOP_LENGTH,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    mel = (spec.real**2 + spec.imag**2).T[:-1] @ bank  # [frames, n_mels]; Whisper drops the last frame
    logs = torch.clamp(mel, min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).T.numpy()


def ctc_target(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as CTC spells it: with a leading space, so that a word is the same token
    wherever it stands (the byte-level BPE gives 'the' first and 'Ġthe' after a space)."""
    return list(tokenizer.encode(" " + text.strip()).ids)


class SpeechMaker:
    """Makes fresh speech and mixed examples; one per batch-making process (its own espeak-ng copy)."""

    def __init__(
        self,
        tokenizer: Any,
        sentences: Sequence[str],
        words: Sequence[str],
        held_out: set[str],
        scenes: Sequence[Example] = (),
        kind_weight: Mapping[str, float] | None = None,
    ) -> None:
        self.tok, self.sentences, self.held_out = tokenizer, list(sentences), held_out
        self.words = list(words[:WORD_POOL])
        self.asr_prompt = tokenizer.encode(ASR_PROMPT).ids
        self.mixed_prompt = tokenizer.encode(MIXED_PROMPT).ids
        self.scenes = [ex for ex in scenes if ex.kind in MIXED_KINDS]
        self.scene_p = mixed_kind_probabilities([ex.kind for ex in self.scenes], kind_weight)
        if not self.sentences or not self.words:
            from omniedge.errors import OmniedgeError

            raise OmniedgeError("the pack has no speech sentences", "re-make the pack (train.py pack)")

    def text(self, rng: np.random.Generator, words_fraction: float) -> str:
        """A training sentence, or with probability `words_fraction` a string of random words."""
        while rng.random() < words_fraction:
            n = int(rng.integers(WORD_STRING[0], WORD_STRING[1] + 1))
            s = " ".join(self.words[int(i)] for i in rng.integers(0, len(self.words), n))
            if s not in self.held_out:
                return s
        return self.sentences[int(rng.integers(len(self.sentences)))]

    def _spoken(self, text: str, rng: np.random.Generator) -> np.ndarray:
        from omniedge.data.speech_stream import utterance

        audio, _ = utterance(text, rng)
        return log_mel_fast(audio)

    def speech(self, rng: np.random.Generator, words_fraction: float = 0.0) -> Example:
        return self.speech_of(self.text(rng, words_fraction), rng)

    def speech_of(self, text: str, rng: np.random.Generator) -> Example:
        """`text` spoken by a random training voice, as a transcription example."""
        mel = self._spoken(text, rng)
        return Example("speech", self.tok.encode(text).ids, self.asr_prompt, mel=mel, reference=text,
                       kind="speech", spoken=ctc_target(self.tok, text))  # fmt: skip

    def mixed(self, rng: np.random.Generator) -> Example:
        """A spoken question about a training scene (the scene example's prompt, without its '?')."""
        if not self.scenes:
            from omniedge.errors import OmniedgeError

            raise OmniedgeError("the pack has no scene questions for spoken questions", "re-make the pack")
        pick = (
            rng.choice(len(self.scenes), p=self.scene_p)
            if self.scene_p is not None
            else rng.integers(len(self.scenes))
        )
        return self.mixed_of(self.scenes[int(pick)], rng)

    def mixed_of(self, scene: Example, rng: np.random.Generator) -> Example:
        """`scene`'s question spoken by a random training voice, as a spoken-question example."""
        question = self.tok.decode(scene.prompt).strip().rstrip("?").strip()
        mel = self._spoken(question, rng)
        return replace(
            scene, task="mixed", prompt=self.mixed_prompt, mel=mel, spoken=ctc_target(self.tok, question)
        )


def check_mixed_kind_weight(kind_weight: Mapping[str, float]) -> dict[str, float]:
    """The spoken-question kinds' sampling weights, checked: known kinds, positive finite numbers."""
    from omniedge.errors import OmniedgeError

    out: dict[str, float] = {}
    for kind, w in kind_weight.items():
        if kind not in MIXED_KINDS:
            raise OmniedgeError(
                f"spoken-question kind {kind!r} is not one of {list(MIXED_KINDS)}",
                "weigh the kinds the data set asks, e.g. --mixed-kinds '{\"where\": 3}'",
            )
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w) or w <= 0:
            raise OmniedgeError(f"weight {w!r} for spoken {kind!r} questions is not a positive number",
                                "give each kind a number above 0 (1 is today's share)")  # fmt: skip
        out[kind] = float(w)
    return out


def mixed_kind_probabilities(
    kinds: Sequence[str], kind_weight: Mapping[str, float] | None
) -> np.ndarray | None:
    """Per-scene sampling probabilities: each question row weighs its kind's weight (unlisted kinds 1);
    None (uniform over rows, as without weights) when no weight is given."""
    if not kind_weight or not kinds:
        return None
    checked = check_mixed_kind_weight(kind_weight)
    w = np.array([checked.get(k, 1.0) for k in kinds], np.float64)
    return w / w.sum()


def read_speech_texts(pack: str | Path) -> tuple[list[str], list[str], set[str]]:
    """(sentences, vocabulary by frequency, held-out texts) that a pack carries for synthesis."""
    from omniedge.data.speech_corpus import read_lines

    p = Path(pack)
    if not (p / SENTENCES).is_file():
        return [], [], set()
    return read_lines(p / SENTENCES), read_lines(p / WORDS), set(read_lines(p / HELD_OUT))
