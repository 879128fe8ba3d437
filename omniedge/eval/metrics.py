"""Scores with honest uncertainty: perplexity, accuracy, word error rate, each with a 95% interval.

Perplexity and WER are ratios of sums over units that are not independent token by token (a document's
tokens, an utterance's words), so their intervals come from a bootstrap over those units; accuracy is a
proportion of independent questions, so it gets a Wilson score interval.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A score with its 95% confidence interval and the number of samples it rests on."""

    value: float
    lo: float
    hi: float
    n: int  # samples: documents, questions, utterances
    unit: str  # what n counts
    tokens: int | None = None  # tokens or words behind a ratio score

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_ratio(
    num: Sequence[float], den: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of sum(num)/sum(den), resampling units with replacement."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    ratios = a[idx].sum(1) / np.maximum(b[idx].sum(1), 1e-12)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int], unit: str = "documents") -> Estimate:
    """exp(total NLL / total tokens); interval by bootstrap over the units (e.g. documents)."""
    total, count = float(np.sum(nll_sums)), int(np.sum(token_counts))
    lo, hi = bootstrap_ratio(nll_sums, token_counts)
    return Estimate(math.exp(total / max(count, 1)), math.exp(lo), math.exp(hi), len(nll_sums), unit, count)


def accuracy(correct: Sequence[bool], unit: str = "questions") -> Estimate:
    k, n = int(sum(bool(c) for c in correct)), len(correct)
    lo, hi = wilson(k, n)
    return Estimate(k / n if n else 0.0, lo, hi, n, unit)


def normalize_text(s: str) -> str:
    """Lower case, punctuation dropped (apostrophes kept inside words), single spaces."""
    s = s.lower().replace("\u2019", "'")
    s = re.sub(r"[^a-z0-9' ]+", " ", s)
    return " ".join(w.strip("'") for w in s.split() if w.strip("'"))


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (substitutions, insertions, deletions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str = "utterances") -> Estimate:
    """Corpus WER = total word edits / total reference words; interval by bootstrap over utterances."""
    errs, words = [], []
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = normalize_text(r).split(), normalize_text(h).split()
        errs.append(edit_distance(rw, hw))
        words.append(len(rw))
    total = sum(words)
    lo, hi = bootstrap_ratio(errs, words)
    return Estimate(sum(errs) / max(total, 1), lo, hi, len(refs), unit, total)


def retention(teacher: float, student: float, lower_is_better: bool) -> float:
    """Student / teacher (teacher / student when lower is better, as the article does for WER)."""
    if lower_is_better:
        return teacher / student if student > 0 else float("inf")
    return student / teacher if teacher > 0 else float("inf")
