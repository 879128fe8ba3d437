"""The `prune` stage: score each MoE layer's experts from the teacher's calibration statistics (a
saliency, omniedge.compress.saliency), keep the best of each layer (a budget, omniedge.compress.budget),
cut the router rows and fused expert weights.

Budgets: `uniform` keeps round(E x keep_ratio) in every layer; `global` ranks the experts of all layers
together (each layer's scores divided by their sum), after every layer keeps `min_keep` (default top-k):
it needs every layer's statistics first, so the pipeline runs a statistics-only sweep before pruning.
Counts can be rounded to a multiple (`multiple_of`). `num_experts_per_tok` never changes.

`method: output` ranks a layer's experts by greedy removal on the MoE block's output error instead of a
saliency (omniedge.compress.output_prune): it needs the layer's calibration inputs and outputs, so it works
with the uniform budget only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from omniedge.compress import budget, output_prune, saliency
from omniedge.compress.moe import LayerStats
from omniedge.compress.recipe import (
    as_bool,
    as_choice,
    as_float,
    as_int,
    check_keys,
    recipe_error,
)
from omniedge.compress.reconstruct import TOKEN_WEIGHTS
from omniedge.compress.stages import LayerWork, ModelFacts, Stage
from omniedge.errors import OmniedgeError
from omniedge.int4_modules import EXPERTS_PER_LAYER
from omniedge.models.family import MODALITIES

BUDGETS = ("uniform", "global")


@dataclass(frozen=True)
class PruneSettings:
    method: str = "frequency"  # a saliency (frequency, router_mass, reap, contribution, random), or output
    keep_ratio: float = 0.5  # of all experts (uniform: of each layer's)
    weighting: str | dict[str, float] = "modality"  # how modalities vote (saliency.scores)
    budget: str = "uniform"  # uniform | global
    min_keep: int | None = None  # global: each layer keeps at least this many (default top-k)
    multiple_of: int = 1  # keep counts a multiple of this (8 suits GPU kernels)
    renormalise: bool = True  # norm_topk_prob of the pruned router (Qwen3-Omni is trained with it on)
    seed: int = 0  # of the `random` control (and of method output's token sample)
    token_weight: str = "relative"  # method output: each token's error relative to its MoE output or residual

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "prune") -> PruneSettings:
        d = {**asdict(cls()), **check_keys(dict(raw or {}), asdict(cls()), where)}
        method = as_choice(d["method"], f"{where}.method", [*saliency.methods(), output_prune.METHOD])
        try:
            weighting = saliency.check_weighting(d["weighting"])
        except OmniedgeError as e:
            raise recipe_error(f"{where}.weighting", e.problem, e.fix or "") from None
        min_keep = d["min_keep"]
        if d["token_weight"] != cls.token_weight and method != output_prune.METHOD:
            raise recipe_error(
                f"{where}.token_weight",
                f"weighs tokens for method output only; method {method} scores experts from routing statistics",
                "drop token_weight, or use method: output",
            )
        return cls(
            method=method,
            keep_ratio=as_float(d["keep_ratio"], f"{where}.keep_ratio", 0.0, 1.0),
            weighting=weighting,
            budget=as_choice(d["budget"], f"{where}.budget", BUDGETS),
            min_keep=None if min_keep is None else as_int(min_keep, f"{where}.min_keep"),
            multiple_of=as_int(d["multiple_of"], f"{where}.multiple_of"),
            renormalise=as_bool(d["renormalise"], f"{where}.renormalise"),
            seed=as_int(d["seed"], f"{where}.seed", lo=0),
            token_weight=as_choice(d["token_weight"], f"{where}.token_weight", TOKEN_WEIGHTS),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune_block(block: Any, kept: Sequence[int]) -> None:
    """Keep the listed experts of one sparse MoE block in place (router rows, fused expert weights), in order."""
    e = int(block.gate.weight.shape[0])
    if any(not 0 <= k < e for k in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"bad expert indices {list(kept)} for {e} experts")
    idx = torch.tensor(sorted(kept), dtype=torch.long)
    for module in (block.gate, block.experts):
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] == e:
                sliced = p.data.index_select(0, idx.to(p.device)).contiguous()
                module._parameters[pname] = torch.nn.Parameter(sliced, requires_grad=False)
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)


def _distribution(s: torch.Tensor, kept: list[int]) -> dict[str, Any]:
    """A layer's saliency at a glance: quantiles, and the share of its total that the kept experts hold."""
    q = torch.quantile(s.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    total = float(s.sum())
    return {
        "quantiles": [round(float(v), 6) for v in q],
        "kept_share": round(float(s[kept].sum()) / total, 6) if total > 0 else None,
    }


class PruneStage(Stage):
    name = "prune"
    settings_type = PruneSettings
    settings: PruneSettings

    def __init__(self, settings: PruneSettings, model: ModelFacts) -> None:
        super().__init__(settings, model)
        s = settings
        # Impossible budgets fail here, before any long work.
        self.keep = budget.uniform_budget(model.num_experts, model.top_k, s.keep_ratio, s.multiple_of)
        if s.budget == "global":
            if len(model.moe_layers) < 2:
                raise OmniedgeError(
                    "a global expert budget needs at least two MoE layers to move experts between",
                    "use prune.budget: uniform",
                )
            flat = [torch.ones(model.num_experts) for _ in model.moe_layers]
            budget.global_budget(flat, model.top_k, s.keep_ratio, s.min_keep, s.multiple_of)
        self.needs_all_stats = s.budget == "global"
        if s.method == output_prune.METHOD:
            if s.budget == "global":
                raise OmniedgeError(
                    "prune.method output ranks experts within each layer (by greedy removal on that layer's "
                    "output), so it cannot share one budget across layers",
                    "use prune.budget: uniform with method output, or a saliency with budget: global",
                )
            if s.weighting == "max":
                raise OmniedgeError(
                    "prune.weighting max takes each expert's best modality score; method output has no "
                    "per-expert score to take it from",
                    "use weighting: modality, token, or {text: 1, image: 1, audio: 2} with method output",
                )
            self.needs_inputs = self.needs_moe_output = True  # the layer's calibration inputs and outputs
        self.removal: dict[int, dict[str, Any]] = {}
        self.counts: dict[int, int] = {li: self.keep for li in model.moe_layers}
        self.kept: dict[int, list[int]] = {}
        self.saliency: dict[int, dict[str, torch.Tensor]] = {}  # per layer: overall and per-modality scores
        self.routed = torch.zeros(3, dtype=torch.float64)
        self.routed_kept = torch.zeros(3, dtype=torch.float64)

    def scores(self, stats: LayerStats) -> torch.Tensor:
        s = self.settings
        return saliency.scores(stats, s.method, s.weighting, s.seed)

    def plan(self, stats: list[LayerStats]) -> None:
        s = self.settings
        if s.budget != "global":
            return
        counts = budget.global_budget(
            [self.scores(st) for st in stats], self.model.top_k, s.keep_ratio, s.min_keep, s.multiple_of
        )
        self.counts = {st.layer: c for st, c in zip(stats, counts, strict=True)}

    def apply(self, work: LayerWork) -> None:
        if not work.is_moe or work.stats is None:
            return
        s = self.settings
        if s.method == output_prune.METHOD:
            if work.inputs is None:
                raise OmniedgeError("prune.method output ran without calibration inputs", "report this bug")
            x, y, modality = work.inputs.moe_rows()
            scores, info = output_prune.greedy_removal_scores(
                work.layer.mlp,
                x,
                y,
                modality,
                work.top_k,
                s.renormalise,
                self.counts[work.index],
                s.weighting,
                s.seed,
                s.token_weight,
                work.inputs.residual_sq(),
            )
            self.removal[work.index] = info
            self.saliency[work.index] = {"overall": scores}
        else:
            scores = self.scores(work.stats)
            self.saliency[work.index] = {"overall": scores, **saliency.modality_scores(work.stats, s.method)}
        kept = budget.select(scores, self.counts[work.index])
        prune_block(work.layer.mlp, kept)
        work.kept = kept
        work.normalise = self.settings.renormalise
        self.kept[work.index] = kept
        counts = work.stats.counts
        self.routed += counts.sum(1).double()
        self.routed_kept += counts[:, kept].sum(1).double()
        share = budget.routed_share_kept(counts, kept)
        if work.index in self.removal:
            work.report["output_removal"] = self.removal[work.index]
        work.report["prune"] = {
            "experts": len(kept),
            "kept": kept,
            "saliency": _distribution(scores, kept),
            "routed_share_kept": {
                m: round(float(share[i]), 6) for i, m in enumerate(MODALITIES) if counts[i].sum() > 0
            },
        }

    def per_layer_counts(self) -> dict[int, int]:
        return dict(self.counts)

    def config_updates(self, text_config: dict[str, Any]) -> None:
        counts = [self.counts[li] for li in sorted(self.counts)]
        text_config["num_experts"] = max(counts) if counts else text_config.get("num_experts")
        text_config["norm_topk_prob"] = budget.router_config(self.settings.renormalise)["norm_topk_prob"]
        if len(set(counts)) > 1:
            layers = int(text_config.get("num_hidden_layers", max(self.counts) + 1))
            text_config[EXPERTS_PER_LAYER] = [self.counts.get(i, 0) for i in range(layers)]

    def result(self) -> dict[str, Any]:
        # Share of the calibration top-k slots that went to kept experts: 1.0 means routing never needed a
        # pruned expert on this data.
        share = {
            m: round(float(self.routed_kept[i] / self.routed[i]), 6)
            for i, m in enumerate(MODALITIES)
            if self.routed[i] > 0
        }
        counts = sorted(set(self.counts.values()))
        return {
            "experts_before": self.model.num_experts,
            "experts_after": counts[0] if len(counts) == 1 else sum(self.counts.values()) / len(self.counts),
            "experts_per_layer": {str(k): v for k, v in sorted(self.counts.items())},
            "kept": {str(k): v for k, v in sorted(self.kept.items())},
            "routed_share_kept": share,
            **(
                {"output_removal": {str(k): v for k, v in sorted(self.removal.items())}}
                if self.removal
                else {}
            ),
        }
