"""Experiment: REAP max + block fit with hand-set per-layer expert counts (hypothesis test for a budget by layer error)."""
import sys
from omniedge.compress import prune
from omniedge.cli import main

counts = [int(c) for c in sys.argv[1].split(",")]
orig = prune.PruneStage.__init__
def patched(self, settings, model):
    orig(self, settings, model)
    self.counts = {li: c for li, c in zip(sorted(self.counts), counts, strict=True)}
    print("patched counts", self.counts, flush=True)
prune.PruneStage.__init__ = patched
sys.exit(main(sys.argv[2:]))
