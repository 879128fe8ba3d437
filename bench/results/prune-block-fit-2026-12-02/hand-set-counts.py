"""Experiment (issue 10, third pass): `omniedge compress` with the prune stage's per-layer expert counts set by
hand, to test whether moving experts to the layer with the larger error helps. Not a recipe option.

    python3 hand-set-counts.py 8,24 compress omni-mini -o CKPT --recipe RECIPE.yaml
"""

from __future__ import annotations

import sys
from typing import Any

from omniedge.cli import main
from omniedge.compress import prune

counts = [int(c) for c in sys.argv[1].split(",")]
original_init = prune.PruneStage.__init__


def with_counts(self: prune.PruneStage, settings: Any, model: Any) -> None:
    original_init(self, settings, model)
    self.counts = {li: c for li, c in zip(sorted(self.counts), counts, strict=True)}
    print("hand-set counts", self.counts, flush=True)


prune.PruneStage.__init__ = with_counts  # type: ignore[method-assign]
sys.exit(main(sys.argv[2:]))
