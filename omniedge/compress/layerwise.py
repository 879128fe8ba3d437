"""Layer-by-layer compression: one thinker decoder layer on the device at a time.

For each layer: build it from the source (the teacher's weights); pass the teacher's calibration hidden
states through it, collecting router statistics; pass the held-out teacher stream; apply the recipe's
stages in order (prune from this layer's statistics, quantize), after each one passing that stage's
held-out student stream through the layer as it now is; write the layer out; free it. Calibration
activations are always the teacher's (they never depend on what earlier layers lost), so the statistics
of every layer are the teacher's; the student streams measure what each stage costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omniedge.compress.moe import LayerStats, moe_forward, route
from omniedge.compress.prune import PruneStage
from omniedge.compress.quantize import QuantizeStage, WeightInputs
from omniedge.compress.skeleton import LayerInput, ThinkerSkeleton, add_deepstack

MOE_BATCH_TOKENS = 1 << 16  # tokens per batched MoE call: bounds the activations held at once


@dataclass
class Sample:
    """One encoded request on the device: what layer 0 received, its token ids and their modalities."""

    x: LayerInput
    ids: torch.Tensor  # [S] int64
    modality: torch.Tensor  # [S] int64: 0 text, 1 image, 2 audio
    kind: str

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class _MlpInputs(nn.Module):
    """Stands in for a layer's MoE block: keeps its input and returns zeros, so the layer's output is the
    residual stream after attention; the MoE is then run for many requests at once."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[torch.Tensor] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.rows.append(hidden_states.reshape(-1, hidden_states.shape[-1]))
        return torch.zeros_like(hidden_states)


def _groups(samples: list[Sample], limit: int) -> list[list[int]]:
    """Consecutive sample indices whose token total stays within `limit` (a longer sample goes alone)."""
    out: list[list[int]] = [[]]
    total = 0
    for i, s in enumerate(samples):
        if out[-1] and total + s.length > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += s.length
    return [g for g in out if g]


def run_layer(
    layer: nn.Module,
    index: int,
    samples: list[Sample],
    hidden: list[torch.Tensor],
    top_k: int,
    normalise: bool,
    stats: LayerStats | None = None,
    keep_moe_inputs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Hidden states after decoder layer `index` for every sample (attention per sample, the MoE batched
    over samples); `stats` gets the routing statistics, `keep_moe_inputs` the MoE input rows."""
    block = layer.mlp
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        if not hasattr(block, "experts"):  # a dense MLP layer (mlp_only_layers): transformers' forward
            for s, h in zip(samples, hidden, strict=True):
                y = layer(h, **s.x.kwargs)
                out.append(add_deepstack(y[0] if isinstance(y, tuple) else y, s.x, index))
            return out
        for group in _groups(samples, MOE_BATCH_TOKENS):
            rec = _MlpInputs()
            layer.mlp = rec
            try:
                posts = []
                for i in group:
                    y = layer(hidden[i], **samples[i].x.kwargs)
                    posts.append(y[0] if isinstance(y, tuple) else y)
            finally:
                layer.mlp = block
            x = torch.cat(rec.rows)
            rec.rows.clear()
            modality = torch.cat([samples[i].modality for i in group]).to(x.device)
            e = block.experts
            moe = moe_forward(
                x,
                block.gate.weight,
                e.gate_up_proj,
                e.down_proj,
                top_k,
                normalise,
                e.act_fn,
                stats=stats,
                modality=modality,
            )
            if keep_moe_inputs is not None:
                keep_moe_inputs.append(x)
            start = 0
            for i, post in zip(group, posts, strict=True):
                n = samples[i].length
                h = post + moe[start : start + n].view_as(post)
                out.append(add_deepstack(h, samples[i].x, index))
                start += n
    return out


class _Inputs:
    """WeightInputs of one layer's quantized weights, from the teacher's calibration pass (lazy)."""

    def __init__(
        self,
        layer: nn.Module,
        moe_in: torch.Tensor,
        attn_in: dict[str, list[torch.Tensor]],
        top_k: int,
        normalise: bool,
        teacher_gate: torch.Tensor,
        kept: list[int] | None,
    ) -> None:
        self.layer, self.moe_in, self.attn_in = layer, moe_in, attn_in
        r = route(moe_in, teacher_gate, top_k, normalise)  # the teacher's routing of every token
        by_expert = {e: r.token[a:b] for e, a, b in r.spans()}
        empty = torch.zeros(0, dtype=torch.long, device=moe_in.device)
        order = kept if kept is not None else list(range(teacher_gate.shape[0]))
        self.tokens = [by_expert.get(old, empty) for old in order]

    def __call__(self, local: str) -> WeightInputs:
        if local.startswith("self_attn."):
            key = "o_proj" if "o_proj" in local else "qkv"
            return WeightInputs(lambda _e: torch.cat(self.attn_in[key]))
        experts = self.layer.mlp.experts

        def rows(e: int | None) -> torch.Tensor:
            assert e is not None, "fused experts: ask per expert"
            x = self.moe_in[self.tokens[e]]
            if local.endswith("gate_up_proj"):
                return x
            g, u = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            return experts.act_fn(g) * u

        return WeightInputs(rows, lambda e: int(self.tokens[e].numel()))


def _attention_inputs(layer: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    got: dict[str, list[torch.Tensor]] = {"qkv": [], "o_proj": []}

    def keep(key: str) -> Callable[..., None]:
        def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
            got[key].append(args[0].reshape(-1, args[0].shape[-1]))

        return hook

    hooks = [
        layer.self_attn.q_proj.register_forward_pre_hook(keep("qkv")),
        layer.self_attn.o_proj.register_forward_pre_hook(keep("o_proj")),
    ]
    return got, hooks


@dataclass
class Streams:
    """Hidden states carried through the stack: the teacher's calibration stream, and per held-out
    stream name ("teacher", then one per stage) the held-out requests' states."""

    calibration: list[torch.Tensor]
    heldout: dict[str, list[torch.Tensor]]


class LayerByLayer:
    """Runs the recipe's stages over every decoder layer of `skeleton`, calling `write(layer, index,
    packed)` for each finished layer (packed: INT4 tensors by canonical name)."""

    def __init__(self, skeleton: ThinkerSkeleton, stages: list[Any], write: Callable[..., None]) -> None:
        self.sk, self.stages, self.write = skeleton, stages, write
        self.stats: list[LayerStats] = []
        self.seconds: dict[str, float] = {
            "load": 0.0,
            "calibrate": 0.0,
            "measure": 0.0,
            "prune": 0.0,
            "quantize": 0.0,
            "write": 0.0,
        }
        self.layer_seconds: list[float] = []

    def run(self, calib: list[Sample], heldout: list[Sample], progress: bool = True) -> Streams:
        from tqdm.auto import tqdm

        cfg = self.sk.text_config
        top_k, norm = int(cfg.num_experts_per_tok), bool(cfg.norm_topk_prob)
        streams = Streams([s.x.hidden for s in calib], {"teacher": [s.x.hidden for s in heldout]})
        for st in self.stages:
            streams.heldout[st.name] = list(streams.heldout["teacher"])
        for s in [*calib, *heldout]:
            s.x.hidden = None  # type: ignore[assignment]  # the streams own the hidden states now
        needs_inputs = any(getattr(st, "needs_inputs", False) for st in self.stages)
        bar = tqdm(range(len(self.sk.layers)), desc="layers", unit="layer", disable=not progress)
        for li in bar:
            t_layer = time.perf_counter()
            layer = self.sk.layers[li]
            t = time.perf_counter()
            self.sk.load(layer)
            self.seconds["load"] += time.perf_counter() - t
            block = layer.mlp
            is_moe = hasattr(block, "experts")
            stats = LayerStats.empty(li, int(block.gate.weight.shape[0]), top_k) if is_moe else None
            teacher_gate = block.gate.weight.detach().clone() if (is_moe and needs_inputs) else None

            t = time.perf_counter()
            moe_in: list[torch.Tensor] | None = [] if needs_inputs else None
            attn_in, hooks = _attention_inputs(layer) if needs_inputs else ({}, [])
            try:
                streams.calibration = run_layer(
                    layer, li, calib, streams.calibration, top_k, norm, stats, moe_in
                )
            finally:
                for h in hooks:
                    h.remove()
            if stats is not None:
                self.stats.append(stats)
            self.seconds["calibrate"] += time.perf_counter() - t
            t = time.perf_counter()
            streams.heldout["teacher"] = run_layer(
                layer, li, heldout, streams.heldout["teacher"], top_k, norm
            )
            self.seconds["measure"] += time.perf_counter() - t

            packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            kept: list[int] | None = None
            for st in self.stages:
                t = time.perf_counter()
                if isinstance(st, PruneStage) and stats is not None:
                    kept = st.apply_layer(block, stats)
                elif isinstance(st, QuantizeStage):
                    inputs = None
                    if needs_inputs and moe_in is not None:
                        x = torch.cat(moe_in) if moe_in else torch.zeros(0)
                        gate = teacher_gate if teacher_gate is not None else torch.zeros(0, x.shape[-1])
                        inputs = _Inputs(layer, x, attn_in, top_k, norm, gate, kept)
                    packed.update(st.apply_layer(layer, f"thinker.model.layers.{li}.", inputs))
                self.seconds[st.name] += time.perf_counter() - t
                t = time.perf_counter()
                streams.heldout[st.name] = run_layer(
                    layer, li, heldout, streams.heldout[st.name], top_k, norm
                )
                self.seconds["measure"] += time.perf_counter() - t
            t = time.perf_counter()
            self.write(layer, li, packed)
            self.sk.unload(layer)
            self.seconds["write"] += time.perf_counter() - t
            self.layer_seconds.append(time.perf_counter() - t_layer)
        return streams
