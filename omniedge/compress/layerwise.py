"""Layer-by-layer compression: one thinker decoder layer on the device at a time.

For each layer: build it from the source (the teacher's weights); pass the teacher's calibration hidden
states through it, collecting router statistics; pass the held-out teacher stream; apply the recipe's
stages in order (prune from this layer's statistics, quantize), after each one passing that stage's
held-out student stream through the layer as it now is; write the layer out; free it. Calibration
activations are always the teacher's (they never depend on what earlier layers lost), so the statistics
of every layer are the teacher's; the student streams measure what each stage costs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omniedge.compress.layer_inputs import LayerInputs
from omniedge.compress.moe import LayerStats, moe_forward
from omniedge.compress.skeleton import LayerInput, ThinkerSkeleton, add_deepstack
from omniedge.compress.stages import LayerWork, Stage
from omniedge.models.family import REQUEST_KINDS
from omniedge.weights import layer_prefix

MOE_BATCH_TOKENS = 1 << 16  # tokens per batched MoE call: bounds the activations held at once


@dataclass
class Sample:
    """One encoded request on the device: what layer 0 received, its token ids and their modalities."""

    x: LayerInput
    ids: torch.Tensor  # [S] int64
    modality: torch.Tensor  # [S] int64: 0 text, 1 image, 2 audio
    kind: str  # the request's kind (family.REQUEST_KINDS: text, image, audio, image+audio)

    @property
    def request(self) -> int:
        """The request's kind as a number (its index in REQUEST_KINDS)."""
        return REQUEST_KINDS.index(self.kind)

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
    inputs: LayerInputs | None = None,
) -> list[torch.Tensor]:
    """Hidden states after decoder layer `index` for every sample (attention per sample, the MoE batched
    over samples); `stats` gets the routing statistics, `inputs` the MoE input rows."""
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
            start = 0
            for i, post in zip(group, posts, strict=True):
                n = samples[i].length
                h = post + moe[start : start + n].view_as(post)
                out.append(add_deepstack(h, samples[i].x, index))
                start += n
            if inputs is not None:  # with the MoE output: ||what the next layer reads||^2 per token
                resid_sq = request = None
                if inputs.moe_output:  # and each row's request kind
                    resid_sq = torch.cat(
                        [o.reshape(-1, o.shape[-1]).float().square().sum(-1) for o in out[-len(group) :]]
                    )
                    kinds = [torch.full_like(samples[i].modality, samples[i].request) for i in group]
                    request = torch.cat(kinds).to(x.device)
                inputs.add_moe(x, moe, modality, resid_sq, request)
    return out


@dataclass
class Streams:
    """Hidden states carried through the stack: the teacher's calibration stream, and per held-out
    stream name ("teacher", then one per stage) the held-out requests' states."""

    calibration: list[torch.Tensor]
    heldout: dict[str, list[torch.Tensor]]


def layer_error(
    teacher_in: list[torch.Tensor], teacher_out: list[torch.Tensor], student_out: list[torch.Tensor]
) -> float:
    """How far a compressed layer's output is from the teacher's on the same (teacher's) input:
    sum ||y_student - y_teacher||^2 / sum ||y_teacher - x||^2, relative to what the layer adds to the
    residual stream (the residual itself would make every error look small)."""
    num = den = 0.0
    for x, yt, ys in zip(teacher_in, teacher_out, student_out, strict=True):
        num += float((ys.float() - yt.float()).square().sum())
        den += float((yt.float() - x.float()).square().sum())
    return num / den if den > 0 else 0.0


class LayerByLayer:
    """Runs the recipe's stages over every decoder layer of `skeleton`, calling `write(layer, index,
    packed)` for each finished layer (packed: quantizers.Packed by canonical name)."""

    def __init__(self, skeleton: ThinkerSkeleton, stages: list[Stage], write: Callable[..., None]) -> None:
        self.sk, self.stages, self.write = skeleton, stages, write
        self.stats: list[LayerStats] = []
        self.report: list[dict[str, Any]] = []
        self.seconds: dict[str, float] = {"sweep": 0.0, "load": 0.0, "calibrate": 0.0, "measure": 0.0}
        self.seconds.update({st.name: 0.0 for st in stages})
        self.seconds["write"] = 0.0
        self.layer_seconds: list[float] = []
        cfg = skeleton.text_config
        self.top_k, self.normalise = int(cfg.num_experts_per_tok), bool(cfg.norm_topk_prob)

    def _stats_for(self, layer: nn.Module, index: int) -> LayerStats | None:
        if not hasattr(layer.mlp, "experts"):
            return None
        return LayerStats.empty(index, int(layer.mlp.gate.weight.shape[0]), self.top_k)

    def sweep(self, calib: list[Sample], progress: bool = True) -> list[LayerStats]:
        """Every MoE layer's teacher statistics, from a calibration pass that changes nothing (what a
        non-uniform budget ranks before any layer is pruned). The layer-0 inputs are left as they are."""
        from tqdm.auto import tqdm

        t = time.perf_counter()
        hidden = [s.x.hidden for s in calib]
        out: list[LayerStats] = []
        for li in tqdm(range(len(self.sk.layers)), desc="statistics", unit="layer", disable=not progress):
            layer = self.sk.load(self.sk.layers[li])
            stats = self._stats_for(layer, li)
            hidden = run_layer(layer, li, calib, hidden, self.top_k, self.normalise, stats)
            self.sk.unload(layer)
            if stats is not None:
                out.append(stats)
        self.seconds["sweep"] += time.perf_counter() - t
        return out

    def run(self, calib: list[Sample], heldout: list[Sample], progress: bool = True) -> Streams:
        from tqdm.auto import tqdm

        if any(st.needs_all_stats for st in self.stages):
            all_stats = self.sweep(calib, progress)
            for st in self.stages:
                st.plan(all_stats)
        top_k, norm = self.top_k, self.normalise
        streams = Streams([s.x.hidden for s in calib], {"teacher": [s.x.hidden for s in heldout]})
        for st in self.stages:
            streams.heldout[st.name] = list(streams.heldout["teacher"])
        for s in [*calib, *heldout]:
            s.x.hidden = None  # type: ignore[assignment]  # the streams own the hidden states now
        needs_inputs = any(st.needs_inputs for st in self.stages)
        moe_output = any(st.needs_moe_output for st in self.stages)
        bar = tqdm(range(len(self.sk.layers)), desc="layers", unit="layer", disable=not progress)
        for li in bar:
            t_layer = time.perf_counter()
            t = time.perf_counter()
            layer = self.sk.load(self.sk.layers[li])
            self.seconds["load"] += time.perf_counter() - t
            stats = self._stats_for(layer, li)

            t = time.perf_counter()
            inputs = LayerInputs(moe_output) if needs_inputs else None
            with inputs.recording(layer) if inputs is not None else contextlib.nullcontext():
                streams.calibration = run_layer(
                    layer, li, calib, streams.calibration, top_k, norm, stats, inputs
                )
            if stats is not None:
                self.stats.append(stats)
            self.seconds["calibrate"] += time.perf_counter() - t
            t = time.perf_counter()
            teacher_in = streams.heldout["teacher"]
            streams.heldout["teacher"] = run_layer(layer, li, heldout, teacher_in, top_k, norm)
            self.seconds["measure"] += time.perf_counter() - t

            work = LayerWork(li, layer, layer_prefix(li), stats, inputs, top_k, norm)
            errors: dict[str, float] = {}
            for st in self.stages:
                t = time.perf_counter()
                st.apply(work)
                self.seconds[st.name] += time.perf_counter() - t
                t = time.perf_counter()
                streams.heldout[st.name] = run_layer(
                    layer, li, heldout, streams.heldout[st.name], top_k, work.normalise
                )
                isolated = run_layer(layer, li, heldout, teacher_in, top_k, work.normalise)
                errors[st.name] = round(layer_error(teacher_in, streams.heldout["teacher"], isolated), 8)
                self.seconds["measure"] += time.perf_counter() - t
            self.report.append({"layer": li, **work.report, "output_error": errors})
            t = time.perf_counter()
            self.write(layer, li, work.packed)
            self.sk.unload(layer)
            del inputs, work
            self.seconds["write"] += time.perf_counter() - t
            self.layer_seconds.append(time.perf_counter() - t_layer)
        return streams
