"""Decode speed at a given context depth, straight through the thinker runner (no tokenizer, no encoders).

For each context length: a prompt of that many token ids (seeded, drawn from the vocabulary) is embedded
from the bundle's table and prefilled (time to first token = prefill + the first token's pick), then
`new_tokens` tokens are decoded greedily, each timed on the host clock around the whole step (the step
ends when its token id is on the host, so device work is included). Repeated `runs` times; the spread
between runs is reported so a reader can tell noise from a difference.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from omniedge.bench.stats import summarize_ms
from omniedge.runtime.generate import SamplingParams, next_token

percentiles = summarize_ms  # percentiles only with enough samples (bench/stats.py)


def run_spread(per_run_medians_ms: list[float]) -> dict[str, float]:
    """How much the per-run medians differ: (max - min) / median of medians."""
    a = np.asarray(per_run_medians_ms, dtype=np.float64)
    if a.size < 2:
        return {"runs": int(a.size)}
    return {"runs": int(a.size), "relative_range": float((a.max() - a.min()) / np.median(a))}


def decode_at_depth(
    omni: Any, context: int, new_tokens: int, runs: int, seed: int = 0, sync: Any = None
) -> dict[str, Any]:
    """Per-token latency and TTFT for a `context`-token prompt; `omni` is a loaded runtime.app.Omni."""
    thinker, table = omni.thinker, omni.embed_table
    if context + new_tokens > thinker.max_context:
        raise ValueError(
            f"context {context} + {new_tokens} new tokens exceeds the KV cache ({thinker.max_context})"
        )
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    vocab = int(table.shape[0])
    params = SamplingParams(max_new_tokens=new_tokens)
    ttft: list[float] = []
    tokens: list[float] = []
    medians: list[float] = []
    first_ttft = 0.0
    dtype = omni.manifest.thinker.input_dtype  # prompts embedded as the runtime's own are (runtime/app.py)
    for _r in range(runs + 1):  # the first run warms up (allocations, kernel selection, graph capture)
        ids = rng.integers(0, vocab, size=context)
        embeds = np.asarray(table[ids], dtype=dtype)[None]
        pos = np.broadcast_to(np.arange(context), (3, context))
        deep = np.zeros((omni.manifest.text.num_deepstack, 1, context, embeds.shape[-1]), dtype)
        t0 = time.perf_counter()
        tok = next_token(thinker.prefill(embeds, pos, deep), params, rng)
        t_first = time.perf_counter() - t0
        lat: list[float] = []
        picked = [tok]
        for n in range(new_tokens - 1):
            t = time.perf_counter()
            tok = next_token(thinker.decode(table[tok], context + n), params, rng)
            lat.append(time.perf_counter() - t)
            picked.append(tok)
        if _r == 0:  # a prompt length this process has not run yet (after the runtime's own warm-up)
            first_ttft = t_first
            continue
        ttft.append(t_first)
        tokens.extend(lat)
        medians.append(float(np.median(lat)) * 1e3 if lat else 0.0)
    return {
        "context": context,
        "new_tokens": new_tokens,
        "ttft_ms": percentiles(ttft),
        # the first request of this length: on CUDA, kernels meeting a new prompt shape pay for it here
        "ttft_first_request_ms": first_ttft * 1e3,
        "token_ms": percentiles(tokens),
        "decode_tok_s": (1e3 / float(np.median(np.asarray(tokens) * 1e3))) if tokens else None,
        "spread": run_spread(medians),
        "last_run_tokens": [int(t) for t in picked],  # to compare kernel choices on the same prompt
    }
