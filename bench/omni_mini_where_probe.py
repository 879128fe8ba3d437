"""Which cells omni-mini confuses on "where is the <colour> <shape>?" (issue 9's image regression).

    python -m omniedge.bench.omni_mini_where_probe DATASET_DIR MODEL [MODEL ...]

Greedy answers of each model to the first 240 "where" questions of the test split's first 1,400 image
questions; prints accuracy and the most frequent (reference, answer) confusions.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.eval.suite import TorchPredictor
    from omniedge.models.omni_mini import omni_mini_path
    from omniedge.training.batches import dataset_examples

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(args[0])
    for path in args[1:]:
        model, tok = load_checkpoint(omni_mini_path() if path == "omni-mini" else path)
        test = dataset_examples(tok, root, "image", "test", image_size=64, limit=1400, progress=False)
        ex = [e for e in test if e.kind == "where"][:240]
        hyps = [h.strip() for h in TorchPredictor(model, tok, image_size=64).generate(ex, max_new_tokens=6)]
        right = sum(h == e.reference for e, h in zip(ex, hyps, strict=True))
        wrong = Counter((e.reference, h) for e, h in zip(ex, hyps, strict=True) if h != e.reference)
        print(f"{path}: {right}/{len(ex)} right; confusions (reference -> answer): {wrong.most_common(6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
