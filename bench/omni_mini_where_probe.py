"""Which cells omni-mini confuses on "where is the <colour> <shape>?" (issue 9), asked in text or spoken.

    python -m omniedge.bench.omni_mini_where_probe DATASET_DIR MODEL [MODEL ...]
    python -m omniedge.bench.omni_mini_where_probe --spoken DATASET_DIR MODEL [MODEL ...]

Text: greedy answers to the first 240 "where" questions of the test split's first 1,400 image questions.
Spoken (`--spoken`): every "where" question of the spoken-question test split, answered, and the same audio
transcribed with the ASR prompt (the picture left out): how many transcripts name the question's colour and
shape, and how the answers split by that. Prints accuracy and the most frequent (reference, answer) confusions.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

SHAPES = ("circle", "square", "triangle", "diamond")


def _heard(transcript: str, question: str) -> bool:
    """Whether a transcript names the question's colour and shape ("where is the red circle")."""
    words = question.split()
    colour, shape = words[-2], words[-1]
    said = transcript.split()
    return colour in said and shape in said


def _spoken(model: Any, tok: Any, root: Path, path: str) -> None:
    from omniedge.eval.suite import TorchPredictor
    from omniedge.training.batches import ASR_PROMPT, dataset_examples, read_records

    records = read_records(root, "mixed", "test")
    test = dataset_examples(tok, root, "mixed", "test", image_size=64, progress=False)
    pairs = [(e, r["question"]) for e, r in zip(test, records, strict=True) if e.kind == "where"]
    ex, questions = [e for e, _ in pairs], [q for _, q in pairs]
    pred = TorchPredictor(model, tok, image_size=64)
    hyps = [h.strip() for h in pred.generate(ex, max_new_tokens=6)]
    asr = [replace(e, prompt=tok.encode(ASR_PROMPT).ids, pixel_values=None, image_grid=None) for e in ex]
    heard = [h.strip() for h in pred.generate(asr, max_new_tokens=16)]
    split: Counter[tuple[bool, bool]] = Counter()
    for e, h, t, q in zip(ex, hyps, heard, questions, strict=True):
        split[(h == e.reference, _heard(t, q))] += 1
    right = sum(v for (ok, _), v in split.items() if ok)
    wrong = Counter((e.reference, h) for e, h in zip(ex, hyps, strict=True) if h != e.reference)
    print(
        f"{path}: spoken 'where' {right}/{len(ex)} right; confusions (reference -> answer): {wrong.most_common(6)}"
    )
    print(f"  transcript names colour and shape: right {split[(True, True)]}, wrong {split[(False, True)]}; "
          f"does not: right {split[(True, False)]}, wrong {split[(False, False)]}")  # fmt: skip
    for t, q in list(zip(heard, questions, strict=True))[:8]:
        print(f"  said {q!r} -> heard {t!r}")


def main(argv: list[str] | None = None) -> int:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.eval.suite import TorchPredictor
    from omniedge.models.omni_mini import omni_mini_path
    from omniedge.training.batches import dataset_examples

    args = sys.argv[1:] if argv is None else argv
    spoken = "--spoken" in args
    args = [a for a in args if a != "--spoken"]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(args[0])
    for path in args[1:]:
        model, tok = load_checkpoint(omni_mini_path() if path == "omni-mini" else path)
        if spoken:
            _spoken(model, tok, root, path)
            continue
        test = dataset_examples(tok, root, "image", "test", image_size=64, limit=1400, progress=False)
        ex = [e for e in test if e.kind == "where"][:240]
        hyps = [h.strip() for h in TorchPredictor(model, tok, image_size=64).generate(ex, max_new_tokens=6)]
        right = sum(h == e.reference for e, h in zip(ex, hyps, strict=True))
        wrong = Counter((e.reference, h) for e, h in zip(ex, hyps, strict=True) if h != e.reference)
        print(f"{path}: {right}/{len(ex)} right; confusions (reference -> answer): {wrong.most_common(6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
