"""The teacher's calibration inputs of one decoder layer's weights, for calibrated quantizers and reports.

While the calibration stream passes a layer, the rows that reach q/k/v (one input), o_proj and the MoE
block are kept (on the device, for that layer only). A quantize stage then asks for the statistics of
each weight's inputs (omniedge.compress.quantizers.InputStats: row counts, |x| sums, optionally the
Hessian sum x^T x, a seeded sample of rows): a Linear sees every calibration token; expert e of the fused
experts sees only the tokens the (pruned) router sends to it: gate_up_proj their MoE input rows,
down_proj act(gate) * up of those rows, computed with the layer's float weights of that moment.

When a stage asks for it (`reconstruct` fits to it), the teacher's MoE output of those rows, each row's
modality, the kind of request it belongs to, and the squared norm of the residual stream after the MoE
(h + y: what the next layer's RMSNorm divides by) are kept too.

Memory: the kept rows are tokens x (2 hidden + heads x head_dim) values in the compute dtype, one hidden more
with the MoE output (for the 30B recipe: 0.37 M tokens x 8,192 x 2 bytes = 6 GB, 7.6 GB with the output, at
most; freed with the layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omniedge.compress.moe import route
from omniedge.compress.quantizers.observer import InputObserver, InputStats

CHUNK_ROWS = 1 << 15  # rows fed to an observer at once (bounds the float32 copies)


@dataclass(frozen=True)
class Want:
    """What a quantizer needs observed of each weight's inputs."""

    hessian: bool = False
    samples: int = 0
    seed: int = 0


class LayerInputs:
    """Rows that reached one layer's weights during the calibration pass (attach with `recording`)."""

    def __init__(self, moe_output: bool = False) -> None:
        self.moe_output = moe_output  # keep the teacher's MoE output and the rows' modality (add_moe)
        self.rows: dict[str, list[torch.Tensor]] = {
            "qkv": [],
            "o_proj": [],
            "moe": [],
            "moe_out": [],
            "modality": [],
            "request": [],
            "resid_sq": [],
        }

    @contextlib.contextmanager
    def recording(self, layer: nn.Module) -> Iterator[None]:
        """Keep the inputs of q_proj (= k_proj, v_proj) and o_proj while the layer runs."""

        def keep(key: str) -> Callable[..., None]:
            def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
                self.rows[key].append(args[0].reshape(-1, args[0].shape[-1]))

            return hook

        attn = layer.self_attn
        hooks = [
            attn.q_proj.register_forward_pre_hook(keep("qkv")),
            attn.o_proj.register_forward_pre_hook(keep("o_proj")),
        ]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def add_moe(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        modality: torch.Tensor,
        resid_sq: torch.Tensor | None = None,
        request: torch.Tensor | None = None,
    ) -> None:
        """The MoE block's input rows, the teacher's output for them (before any stage changed it), each
        row's modality (0 text, 1 image, 2 audio), ||h + y||^2 of its residual stream after the MoE, and the
        kind of request each row comes from (its index in family.REQUEST_KINDS)."""
        self.rows["moe"].append(x)
        if self.moe_output:
            self.rows["moe_out"].append(y)
            self.rows["modality"].append(modality)
            if request is not None:
                self.rows["request"].append(request)
            if resid_sq is not None:
                self.rows["resid_sq"].append(resid_sq)

    def residual_sq(self) -> torch.Tensor | None:
        """||h + y||^2 [T] of every calibration token (None when not recorded)."""
        return self._all("resid_sq") if self.rows["resid_sq"] else None

    def request_kinds(self) -> torch.Tensor | None:
        """Each calibration token's request kind [T] (family.REQUEST_KINDS; None when not recorded)."""
        return self._all("request") if self.rows["request"] else None

    def moe_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [T, H], the teacher's MoE outputs [T, H], modalities [T]) of every calibration token."""
        return self._all("moe"), self._all("moe_out"), self._all("modality")

    def tokens(self) -> int:
        return sum(int(r.shape[0]) for r in self.rows["qkv"])

    def _all(self, key: str) -> torch.Tensor:
        rows = self.rows[key]
        if not rows:
            raise ValueError(f"no calibration rows were recorded for {key}")
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def linear(self, key: str, want: Want) -> InputStats:
        """InputStats of every calibration token's input to `qkv` or `o_proj`."""
        first = self.rows[key][0]
        obs = InputObserver(
            int(first.shape[-1]),
            hessian=want.hessian,
            samples=want.samples,
            seed=want.seed,
            device=first.device,
        )
        for r in self.rows[key]:
            for a in range(0, r.shape[0], CHUNK_ROWS):
                obs.add(r[a : a + CHUNK_ROWS])
        return obs.stats()

    def experts(
        self, block: nn.Module, top_k: int, normalise: bool, want: Want
    ) -> tuple[InputStats, InputStats]:
        """(gate_up_proj's, down_proj's) InputStats per expert of `block` as it is now (pruned or not), from
        the tokens its router sends to each expert."""
        x = self._all("moe")
        experts = block.experts
        gate_up = experts.gate_up_proj
        e_count, inter, hidden = int(gate_up.shape[0]), int(gate_up.shape[1]) // 2, int(gate_up.shape[2])
        kw: dict[str, Any] = {"hessian": want.hessian, "samples": want.samples, "device": x.device}
        obs_in = InputObserver(hidden, e_count, seed=want.seed, **kw)
        obs_mid = InputObserver(inter, e_count, seed=want.seed + 1, **kw)
        r = route(x, block.gate.weight, top_k, normalise)
        with torch.inference_mode():
            for e, a, b in r.spans():
                tok = r.token[a:b]
                for c in range(0, tok.shape[0], CHUNK_ROWS):
                    xe = x[tok[c : c + CHUNK_ROWS]]
                    g, u = F.linear(xe, gate_up[e]).chunk(2, dim=-1)
                    obs_in.add(xe, e)
                    obs_mid.add(experts.act_fn(g) * u, e)
        return obs_in.stats(), obs_mid.stats()
