"""What quantizers learn from calibration about one weight's inputs, per expert for fused experts.

The calibration pass feeds `InputObserver.add` with the rows a weight multiplies (for an expert: only
the tokens routed to it) and hands `stats()` to the quantizer:
- rows and the per-channel sum of |x| (always; AWQ's activation statistic);
- the sum of x^T x, [K, K] per expert (GPTQ's Hessian, up to a factor), when asked;
- a uniform sample of up to `samples` rows per expert (AWQ's loss and output-aware clip search), kept
  with seeded random priorities (the rows with the smallest keys), zero rows where fewer were seen.
Memory: a Hessian is 4 K^2 bytes per expert (16 MiB at K = 2048); samples 4 S K bytes per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class InputStats:
    """Leading shape [] for a Linear, [E] for fused experts."""

    rows: torch.Tensor  # [...] int64
    abs_sum: torch.Tensor  # [..., K] float32
    hessian: torch.Tensor | None = None  # [..., K, K] float32: sum of x^T x
    samples: torch.Tensor | None = None  # [..., S, K] float32

    @property
    def experts(self) -> int | None:
        return None if self.rows.dim() == 0 else int(self.rows.shape[0])

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.rows.clamp_min(1).unsqueeze(-1).to(self.abs_sum.dtype)

    def scaled(self, s: torch.Tensor) -> InputStats:
        """The statistics of the inputs x / s (after an input scale s [..., K] is folded upstream)."""
        s = s.to(self.abs_sum.device, torch.float32)
        return InputStats(
            self.rows,
            self.abs_sum / s,
            None if self.hessian is None else self.hessian / (s.unsqueeze(-1) * s.unsqueeze(-2)),
            None if self.samples is None else self.samples / s.unsqueeze(-2),
        )

    def select(self, experts: torch.Tensor) -> InputStats:
        """The statistics of a subset of experts (index or boolean mask on the leading dim)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[experts.to(t.device)]

        return replace(
            self,
            rows=self.rows[experts.to(self.rows.device)],
            abs_sum=pick(self.abs_sum),
            hessian=pick(self.hessian),
            samples=pick(self.samples),
        )


class InputObserver:
    """Accumulates InputStats for one weight with input width `k` (`experts` = E for fused experts)."""

    def __init__(
        self,
        k: int,
        experts: int | None = None,
        *,
        hessian: bool = False,
        samples: int = 0,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        lead = () if experts is None else (experts,)
        self.k, self.experts = k, experts
        self.rows = torch.zeros(lead, dtype=torch.int64, device=device)
        self.abs_sum = torch.zeros(*lead, k, dtype=torch.float32, device=device)
        self.hessian = torch.zeros(*lead, k, k, dtype=torch.float32, device=device) if hessian else None
        self.sample = torch.zeros(*lead, samples, k, dtype=torch.float32, device=device) if samples else None
        self.keys = torch.full((*lead, samples), float("inf"), device=device) if samples else None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.gen = torch.Generator(device=dev).manual_seed(seed)

    def add(self, x: torch.Tensor, expert: int | None = None) -> None:
        """Rows x [n, K] that this weight (or expert `expert` of it) multiplied."""
        if (expert is None) != (self.experts is None):
            raise ValueError("pass `expert` exactly when the observer is per expert")
        x = x.reshape(-1, self.k).to(self.abs_sum.device, torch.float32)
        if x.shape[0] == 0:
            return
        sel = () if expert is None else (expert,)
        self.rows[sel] += x.shape[0]
        self.abs_sum[sel] += x.abs().sum(0)
        if self.hessian is not None:
            self.hessian[sel] += x.T @ x
        if self.sample is not None and self.keys is not None:
            keys = torch.rand(x.shape[0], generator=self.gen, device=x.device)
            all_keys = torch.cat((self.keys[sel], keys))
            best = torch.topk(all_keys, self.keys.shape[-1], largest=False).indices
            rows = torch.cat((self.sample[sel], x))[best]
            self.keys[sel] = all_keys[best]
            self.sample[sel] = torch.where(torch.isinf(self.keys[sel]).unsqueeze(-1), 0.0, rows)

    def stats(self) -> InputStats:
        return InputStats(self.rows, self.abs_sum, self.hessian, self.sample)
