"""bench/h200/kernel_sweep.py's paired summary: each variant's decode p50 per round and its ratio to the first
variant of the same round, so a drift between rounds cancels out of the ratio."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest


def _sweep() -> Any:
    pytest.importorskip("onnxruntime")
    path = Path(__file__).resolve().parents[1] / "bench" / "h200" / "kernel_sweep.py"
    spec = importlib.util.spec_from_file_location("kernel_sweep", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(variant: str, rnd: int, p50: dict[int, float]) -> dict[str, Any]:
    return {
        "variant": variant,
        "round": rnd,
        "contexts": [{"context": c, "token_ms": {"p50": v}} for c, v in p50.items()],
    }


def test_ratios_are_paired_within_a_round_and_missing_runs_are_skipped() -> None:
    ks = _sweep()
    rows = [
        _row("base", 0, {512: 3.0, 4096: 3.2}),
        _row("fast", 0, {512: 2.7, 4096: 3.2}),
        _row("base", 1, {512: 3.3, 4096: 3.5}),  # a slower round: both variants drift together
        _row("fast", 1, {512: 2.97}),  # its 4096 run failed
        {"variant": "broken", "round": 0, "error": "boom"},
    ]
    out = {(s["variant"], s["context"]): s for s in ks.paired_summary(rows, ["base", "fast", "broken"])}
    fast = out[("fast", 512)]
    assert fast["p50_by_round"] == [2.7, 2.97] and fast["p50_median"] == pytest.approx(2.835)
    assert fast["ratio_median"] == pytest.approx(0.9) and fast["ratio_min"] == fast[
        "ratio_max"
    ] == pytest.approx(0.9)
    assert out[("fast", 4096)]["p50_by_round"] == [3.2] and out[("fast", 4096)]["ratio_median"] == 1.0
    assert out[("base", 512)]["ratio_median"] == 1.0
    assert not any(v == "broken" for v, _ in out)
