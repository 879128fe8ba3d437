"""The soak benchmark, shortened for CI: mixed requests from 8 threads through `omniedge serve` (a child
process) under the least budget the bundle needs, so the encoders evict each other.

The full run (500 requests) is `python3 -m omniedge.bench.soak`; its result is in bench/results/.
"""

from __future__ import annotations

from pathlib import Path

from omniedge.bench.soak import run_soak


def test_short_soak_under_a_budget_that_forces_evictions(fresh_bundle: Path) -> None:
    r = run_soak(fresh_bundle, requests=48, threads=8, max_context=400)
    assert r["kinds"] == {"text": 12, "image": 12, "audio": 12, "image+audio": 12}
    assert r["lost"] == [] and r["answered"] == 48  # no request lost
    assert r["equal_to_single_threaded"] == 48  # every answer as when asked alone, same seed
    # The budget really was tight: the encoders do not both fit while the longest audio clip runs.
    assert r["evictions"].get("vision", 0) >= 2
    assert r["peak_bytes"] <= r["budget_bytes"]  # the server's own high-water mark (exact on Linux)
    assert r["sampled_peak_bytes"] <= r["budget_bytes"]
    assert r["over_budget_events"] == 0
    assert r["budget_bytes"] < r["plan_at_start"]["all_resident_bytes"]
