"""Latency summaries that claim no more than the samples support: a percentile p is reported only with at
least 100 / (100 - p) samples (p50: 2, p90: 10, p99: 100), i.e. when at least one sample lies beyond it;
otherwise the summary says how many it would need."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def samples_needed(p: float) -> int:
    """Fewest samples for which the p-th percentile is not simply the largest sample."""
    return math.ceil(100.0 / (100.0 - p) - 1e-9)


def summarize_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """{"n", "mean", "p50", "p90", "p99"} in milliseconds; a percentile without enough samples is None
    and `too_few_for` names it with the count it needs."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    out: dict[str, Any] = {"n": int(a.size), "mean": float(a.mean())}
    too_few: dict[str, int] = {}
    for p in PERCENTILES:
        if a.size >= samples_needed(p):
            out[f"p{p}"] = float(np.percentile(a, p))
        else:
            out[f"p{p}"] = None
            too_few[f"p{p}"] = samples_needed(p)
    if too_few:
        out["too_few_for"] = too_few
    return out


def describe(summary: dict[str, Any], keys: Sequence[str] = ("p50", "p90", "p99")) -> str:
    """'p50 3.10 ms, p90 3.52 ms' for the percentiles that have enough samples, and a note for the rest."""
    n = summary.get("n", 0)
    if not n:
        return "not measured"
    shown = [f"{k} {summary[k]:.2f} ms" for k in keys if summary.get(k) is not None]
    missing = [k for k in keys if summary.get(k) is None]
    if missing:
        need = (summary.get("too_few_for") or {}).get(missing[0], 0)
        shown.append(f"{'/'.join(missing)} need >= {need} samples (have {n})")
    if not any(summary.get(k) is not None for k in keys):
        shown.insert(0, f"mean {summary['mean']:.2f} ms")
    return ", ".join(shown)
