"""Bench percentiles claim no more than the samples support."""

from __future__ import annotations

import pytest

from omniedge.bench.stats import describe, samples_needed, summarize_ms


def test_samples_needed() -> None:
    assert [samples_needed(p) for p in (50, 90, 99)] == [2, 10, 100]


def test_five_samples_give_a_median_and_no_tail() -> None:
    s = summarize_ms([0.001, 0.002, 0.003, 0.004, 0.005])
    assert s["n"] == 5 and s["mean"] == pytest.approx(3.0) and s["p50"] == pytest.approx(3.0)
    assert s["p90"] is None and s["p99"] is None and s["too_few_for"] == {"p90": 10, "p99": 100}
    text = describe(s)
    assert text == "p50 3.00 ms, p90/p99 need >= 10 samples (have 5)"
    assert describe(summarize_ms([0.004]), ("p50",)) == "mean 4.00 ms, p50 need >= 2 samples (have 1)"


def test_enough_samples_give_every_percentile() -> None:
    s = summarize_ms([i / 1000 for i in range(1, 101)])
    assert s["p99"] == pytest.approx(99.01) and "too_few_for" not in s
    assert "need" not in describe(s)
    assert summarize_ms([]) == {"n": 0} and describe({"n": 0}) == "not measured"
