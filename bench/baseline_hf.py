"""The baseline a user would otherwise run: transformers' own thinker, prefill then greedy decode with its
KV cache, timed the same way as `decode_depth` (host clock around each step, the token id on the host).

Runs in a child process (`python -m omniedge.bench.baseline_hf ...`, JSON on stdout) so torch's memory never
shows in omniedge's figures. The model is a checkpoint (the very one a bundle was exported from), or, for
full-size timing on a GPU, the checkpoint's config with random weights made on the device (timing does
not depend on weight values).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.bench.decode_depth import percentiles, run_spread


def _load(checkpoint: Path, random_weights: bool, device: str, dtype: str, experts: str | None) -> Any:
    import torch
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

    td = getattr(torch, dtype)
    if random_weights:
        cfg = Qwen3OmniMoeConfig.from_pretrained(str(checkpoint)).thinker_config
        with torch.device(device):
            thinker = m.Qwen3OmniMoeThinkerForConditionalGeneration._from_config(cfg, dtype=td)
        for p in thinker.parameters():  # N(0, 0.02) like the initializer, fast on the device
            p.data.normal_(0, 0.02)
    else:
        from omniedge.checkpoint import load_checkpoint

        # float weights (INT4 ones dequantized once): transformers' own speed, not an on-the-fly dequantizer's
        model, _ = load_checkpoint(checkpoint, dtype=td, dequantize=True)
        thinker = model.thinker.to(device)
    if experts or device == "cpu":
        # on the CPU the default grouped_mm needs 16-byte-aligned weights; eager is what a CPU user runs
        thinker.set_experts_implementation(experts or "eager")
    return thinker.eval()


def hf_decode(
    checkpoint: Path,
    contexts: list[int],
    new_tokens: int,
    runs: int,
    device: str = "cpu",
    dtype: str = "float32",
    random_weights: bool = False,
    experts: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    import torch

    thinker = _load(checkpoint, random_weights, device, dtype, experts)
    vocab = int(thinker.config.text_config.vocab_size)
    rng = np.random.default_rng(seed)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results = []
    with torch.no_grad():
        for context in contexts:
            ttft: list[float] = []
            tokens: list[float] = []
            medians: list[float] = []
            for r in range(runs + 1):  # first run warms up
                ids = torch.from_numpy(rng.integers(0, vocab, size=(1, context))).to(device)
                sync()
                t0 = time.perf_counter()
                out = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
                cache = getattr(out, "past_key_values", None)
                tok = int(out.logits[0, -1].argmax())
                t_first = time.perf_counter() - t0
                lat = []
                for _ in range(new_tokens - 1):
                    t = time.perf_counter()
                    out = thinker(
                        input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True
                    )
                    cache = out.past_key_values
                    tok = int(out.logits[0, -1].argmax())
                    lat.append(time.perf_counter() - t)
                if r == 0:
                    continue
                ttft.append(t_first)
                tokens.extend(lat)
                medians.append(float(np.median(lat)) * 1e3)
            results.append(
                {
                    "context": context,
                    "new_tokens": new_tokens,
                    "ttft_ms": percentiles(ttft),
                    "token_ms": percentiles(tokens),
                    "spread": run_spread(medians),
                }
            )
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    import transformers

    return {
        "engine": "transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": device,
        "dtype": dtype,
        "experts_implementation": experts or ("eager" if device == "cpu" else "default"),
        "random_weights": random_weights,
        "checkpoint": str(checkpoint),
        "peak_gpu_mib": peak / 2**20 if peak is not None else None,
        "contexts": results,
    }


def run_baseline_subprocess(args: list[str]) -> dict[str, Any]:
    """Run this module in a child process with `args`; its JSON report."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "omniedge.bench.baseline_hf", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"transformers baseline failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--contexts", type=int, nargs="+", default=[512])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--experts", help="transformers experts implementation: eager, batched_mm, grouped_mm")
    a = p.parse_args(argv)
    r = hf_decode(
        a.checkpoint, a.contexts, a.new_tokens, a.runs, a.device, a.dtype, a.random_weights, a.experts
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
