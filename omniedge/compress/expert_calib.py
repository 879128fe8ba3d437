"""One calibration pass over a fused MoE block that also feeds saliency and quantizer statistics.

`observe_moe` computes exactly what transformers' Qwen3-Omni experts compute (each chosen expert on the
tokens routed to it, weighted by the router, summed), and on the way records, per expert:
- ||expert_j(x)||_2 of each routed token (into ExpertStats, with the router's choices and weights);
- the rows gate_up_proj multiplied (x) and the rows down_proj multiplied (act(gate) * up), into
  InputObservers, so GPTQ / AWQ see only the calibration inputs of the tokens routed to that expert.
The layer-by-layer pipeline calls it in place of the block's expert forward during calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from omniedge.compress.quantizers.observer import InputObserver
from omniedge.compress.saliency import ExpertStats


@dataclass(frozen=True)
class ExpertBatch:
    """The tokens routed to one expert in one batch."""

    expert: int
    rows: torch.Tensor  # [n] token positions
    slots: torch.Tensor  # [n] which of the token's top-k picks this is
    x: torch.Tensor  # [n, H] gate_up_proj's input
    h: torch.Tensor  # [n, I] down_proj's input: act(gate) * up
    y: torch.Tensor  # [n, H] the expert's output, before the routing weight


def expert_batches(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu,
) -> Iterator[ExpertBatch]:
    """Each expert that some token chose, on its tokens: gate_up [E, 2I, H], down [E, H, I], x [T, H],
    top_k_index [T, k]."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pick = order[start : start + n]
        start += n
        rows, slots = pick // k, pick % k
        xe = x[rows]
        gate, up = torch.nn.functional.linear(xe, gate_up[e]).chunk(2, dim=-1)
        h = act(gate) * up
        yield ExpertBatch(e, rows, slots, xe, h, torch.nn.functional.linear(h, down[e]))


def observe_moe(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    modality: torch.Tensor | None = None,
    stats: ExpertStats | None = None,
    gate_up_inputs: InputObserver | None = None,
    down_inputs: InputObserver | None = None,
    act: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu,
) -> torch.Tensor:
    """The experts' output [T, H] for x [T, H] (as the MoE block computes it), recording what was asked:
    `stats` (needs `modality` [T]), and the per-expert inputs of gate_up_proj and down_proj."""
    out = torch.zeros_like(x)
    norms = torch.zeros(top_k_index.shape, dtype=torch.float32, device=x.device)
    for b in expert_batches(gate_up, down, x, top_k_index, act):
        w = top_k_weights[b.rows, b.slots, None]
        out.index_add_(0, b.rows, (b.y * w).to(out.dtype))
        norms[b.rows, b.slots] = b.y.float().norm(dim=-1)
        if gate_up_inputs is not None:
            gate_up_inputs.add(b.x, b.expert)
        if down_inputs is not None:
            down_inputs.add(b.h, b.expert)
    if stats is not None:
        if modality is None:
            raise ValueError("ExpertStats need the modality of every token")
        stats.update(modality, top_k_index, top_k_weights, norms)
    return out
