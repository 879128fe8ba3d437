"""Per-layer expert load per modality: do experts specialise, and which ones could pruning drop?

A token's modality is what its position holds: an image placeholder (image), an audio placeholder
(audio) or anything else (text). Load = how often an expert is among a token's top-k. Two numbers per
layer and modality: the normalised entropy of the load (1 = perfectly uniform, 0 = one expert takes all)
and the share of assignments taken by the busiest 25% of experts (0.25 = uniform).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniedge.models.family import MODALITIES


@dataclass
class ExpertLoad:
    """Assignment counts [layer, expert] per modality, accumulated over batches."""

    num_layers: int
    num_experts: int
    top_k: int
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m in MODALITIES:
            self.counts.setdefault(m, np.zeros((self.num_layers, self.num_experts), np.int64))

    def add(self, router_logits: Any, modality: np.ndarray) -> None:
        """router_logits: per layer [tokens, experts]; modality: [tokens] index into MODALITIES, -1 = pad."""
        import torch

        for layer, logits in enumerate(router_logits):
            chosen = torch.topk(logits.float(), self.top_k, dim=-1).indices.cpu().numpy()
            for mi, m in enumerate(MODALITIES):
                sel = chosen[modality == mi].reshape(-1)
                if sel.size:
                    self.counts[m][layer] += np.bincount(sel, minlength=self.num_experts)

    def report(self) -> dict[str, Any]:
        """{modality: {"tokens": n, "layers": [{"layer", "entropy", "top25_share", "load"}]}} plus 'all'."""
        out: dict[str, Any] = {}
        total = sum(self.counts.values())
        for name, c in [*self.counts.items(), ("all", total)]:
            tokens = int(c[0].sum() // self.top_k) if len(c) else 0
            if tokens == 0:
                continue
            out[name] = {"tokens": tokens, "layers": [layer_stats(i, row) for i, row in enumerate(c)]}
        return out


@contextlib.contextmanager
def capture_router_logits(model: Any) -> Iterator[list[Any]]:
    """Collect each MoE layer's router logits [tokens, experts] during forwards, in layer order.

    Forward hooks on the routers, since transformers releases differ in whether the model output
    carries router_logits (5.17's thinker drops them, 5.24's keeps them).
    """
    from omniedge.models.family import moe_blocks

    captured: list[Any] = []
    handles = [
        block.gate.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        for _, block in moe_blocks(model)
    ]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def normalised_entropy(load: np.ndarray) -> float:
    p = load / max(load.sum(), 1)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(len(load)))


def top_share(load: np.ndarray, fraction: float = 0.25) -> float:
    k = max(1, round(len(load) * fraction))
    return float(np.sort(load)[::-1][:k].sum() / max(load.sum(), 1))


def layer_stats(layer: int, load: np.ndarray) -> dict[str, Any]:
    return {
        "layer": layer,
        "entropy": round(normalised_entropy(load), 4),
        "top25_share": round(top_share(load), 4),
        "load": load.astype(int).tolist(),
    }


def token_modalities(input_ids: Any, attention_mask: Any, image_pad: int, audio_pad: int) -> np.ndarray:
    """[batch*seq] modality index per position (0 text, 1 image, 2 audio, -1 padding)."""
    ids = input_ids.cpu().numpy().reshape(-1)
    mask = attention_mask.cpu().numpy().reshape(-1).astype(bool)
    mod = np.zeros(ids.shape, np.int64)
    mod[ids == image_pad] = 1
    mod[ids == audio_pad] = 2
    mod[~mask] = -1
    return mod


def format_report(report: dict[str, Any]) -> str:
    """A short table: one row per modality and layer."""
    lines = ["modality  layer  tokens   norm.entropy  top-25% share"]
    for m, r in report.items():
        for st in r["layers"]:
            lines.append(
                f"{m:<8}  {st['layer']:>5}  {r['tokens']:>7}  {st['entropy']:>12.3f}  {st['top25_share']:>13.3f}"
            )
    return "\n".join(lines)
