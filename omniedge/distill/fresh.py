"""Speech and spoken questions synthesised afresh for every distillation step (`--fresh-speech`).

A pack's packed training audio is a few thousand utterances (what fits a device call): a run of a few hundred
steps hears each of them 20-30 times, and the student learns those recordings rather than speech. With
`--fresh-speech` the speech and spoken-question examples of a step are synthesised from the training pack's
speech sentences and scene questions (`python -m omniedge.training.train pack DATASET OUT`, which writes them)
by the same voices, noise and rooms as omni-mini's own training (omniedge.training.synth), so no utterance is
heard twice. The teacher runs on the fly: a top-k cache cannot hold logits of audio made later.

What a step holds is a pure function of (seed, step, position), as the rest of the batch plan
(omniedge.distill.data): the step's picks (which sentence, which scene) come from one generator per step, each
utterance from one generator per (step, position), and positions go to processes and micro-batches by the
same slot rule. So a resumed run, or two processes instead of one with 2 accumulation steps, hears the same audio.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.training.batches import Example

FRESH_TASKS = ("speech", "mixed")
_STREAM = 7919  # separates these generators from the batch plan's


class FreshSpeech:
    """The speech / spoken-question part of each step's global batch, made when the step is collated."""

    def __init__(
        self,
        pack: Path,
        tokenizer: Any,
        scenes: list[Example],
        per_task: dict[str, int],
        seed: int,
        world: int,
        accum: int,
        mixed_kinds: dict[str, float] | None = None,
    ) -> None:
        from omniedge.data.build import MIXED_TASKS
        from omniedge.training.synth import SENTENCES, mixed_kind_probabilities, read_speech_texts

        sentences, words, held_out = read_speech_texts(pack)
        if not sentences:
            raise OmniedgeError(
                f"--fresh-speech needs the speech sentences of a training pack, and {pack} has none ({SENTENCES})",
                "make the pack with `python -m omniedge.training.train pack DATASET OUT` (it writes them), "
                "or drop --fresh-speech",
            )
        self.sentences = [s for s in sentences if s not in held_out]
        self.words, self.held_out = words, held_out
        self.scenes = [ex for ex in scenes if ex.kind in MIXED_TASKS]
        self.per_task = {t: int(per_task.get(t, 0)) for t in FRESH_TASKS}
        if self.per_task["mixed"] and not self.scenes:
            raise OmniedgeError(
                f"--fresh-speech asks for spoken questions, but {pack} holds no scene questions to speak",
                'load its image examples (a pack with image/train), or give "mixed": 0 in --batch',
            )
        # spoken-question kinds weighed as omni-mini's training weighs them (`--mixed-kinds`); None: uniform
        self.mixed_kinds = dict(mixed_kinds) if mixed_kinds else None
        self.scene_p = mixed_kind_probabilities([ex.kind for ex in self.scenes], self.mixed_kinds)
        self.tok, self.seed, self.slots, self.accum = tokenizer, seed, world * accum, accum
        self._sentences_sha = hashlib.sha256((Path(pack) / SENTENCES).read_bytes()).hexdigest()
        self._maker: Any = None  # made in the process that collates (each its own espeak-ng)

    def identity(self) -> dict[str, Any]:
        """What the fresh examples are made from: part of the run's key and record."""
        return {
            "sentences": len(self.sentences),
            "sentences_sha256": self._sentences_sha,
            "scenes": len(self.scenes),
            "per_step": self.per_task,
            "mixed_kinds": self.mixed_kinds,
        }

    def picks(self, step: int) -> list[tuple[str, int]]:
        """(task, sentence or scene index) for every position of the step, task by task."""
        rng = np.random.default_rng([self.seed, _STREAM, step])
        out: list[tuple[str, int]] = []
        for task in FRESH_TASKS:
            n, pool = self.per_task[task], len(self.sentences if task == "speech" else self.scenes)
            if not n:
                continue
            weighted = task == "mixed" and self.scene_p is not None
            picked = rng.choice(pool, n, p=self.scene_p) if weighted else rng.integers(0, pool, n)
            out += [(task, int(i)) for i in picked]
        return out

    def tokens(self, step: int) -> int:
        """Predicted positions of the step's fresh examples (answer + <|im_end|> each), known before synthesis."""
        n = 0
        for task, i in self.picks(step):
            answer = self.tok.encode(self.sentences[i]).ids if task == "speech" else self.scenes[i].answer
            n += len(answer) + 1
        return n

    def micro_batch(self, step: int, rank: int, m: int, limit: int | None = None) -> list[Example]:
        """This process's micro-batch `m` of the step: its slot's positions (the first `limit`), synthesised."""
        if self._maker is None:
            from omniedge.training.synth import SpeechMaker

            self._maker = SpeechMaker(
                self.tok, self.sentences, self.words or ["a"], self.held_out, self.scenes
            )
        picks = self.picks(step)
        out = []
        for pos in list(range(rank * self.accum + m, len(picks), self.slots))[:limit]:
            task, i = picks[pos]
            rng = np.random.default_rng([self.seed, _STREAM, step, pos])
            out.append(
                self._maker.speech_of(self.sentences[i], rng)
                if task == "speech"
                else self._maker.mixed_of(self.scenes[i], rng)
            )
        return out

    def reset(self) -> None:
        """Drop this process's synthesiser (before batch-making processes fork: each makes its own)."""
        self._maker = None

    def __getstate__(self) -> dict[str, Any]:  # worker processes make their own SpeechMaker
        return {**self.__dict__, "_maker": None}
