"""`prune.method: output` (omniedge/compress/output_prune.py): experts ranked by greedy removal on the MoE block's
output error, checked against the pruned block's own forward on transformers' real MoE block of the tiny model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from omniedge.compress.moe import moe_forward
from omniedge.compress.output_prune import _Trial, greedy_removal_scores
from omniedge.compress.prune import prune_block
from omniedge.compress.reconstruct import token_weights
from omniedge.errors import OmniedgeError


@pytest.fixture(scope="module")
def block() -> Any:
    from omniedge.models.family import moe_blocks
    from omniedge.models.tiny import build_tiny

    return moe_blocks(build_tiny(0)[0])[0][1]


def _moe(b: Any, x: torch.Tensor, normalise: bool = True) -> torch.Tensor:
    e = b.experts
    return moe_forward(x, b.gate.weight, e.gate_up_proj, e.down_proj, b.gate.top_k, normalise, e.act_fn)


def _data(b: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b.gate.weight.shape[1], generator=g)
    with torch.no_grad():
        y = _moe(b, x)
    return x, y, torch.randint(0, 3, (n,), generator=g)


def _pruned_error(
    b: Any, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, kept: list[int], norm: bool
) -> float:
    """The weighted output error of the block actually pruned to `kept` (its own forward)."""
    p = copy.deepcopy(b)
    prune_block(p, kept)
    with torch.no_grad():
        pred = _moe(p, x, norm)
    return float((c * (y - pred).square().sum(-1)).sum() / (c * y.square().sum(-1)).sum())


@pytest.mark.parametrize("normalise", [True, False])
def test_a_trial_equals_the_pruned_blocks_own_output(block: Any, normalise: bool) -> None:
    """The error of a kept set computed from each expert's output once (regrouped, rerouted to the
    next-best kept expert, renormalised or not) equals the pruned block's forward."""
    x, y, modality = _data(block, 400, 0)
    c = token_weights(y, "relative", modality)
    trial = _Trial(block, x, y, c, block.gate.top_k, normalise)
    e = int(block.gate.weight.shape[0])
    assert trial.cand.shape[1] == e  # a layer this small: every expert is a candidate of every token
    for kept in (list(range(e)), list(range(0, e, 2)), [0, 1, 2, e - 1]):
        mask = torch.zeros(e, dtype=torch.bool)
        mask[kept] = True
        want = 0.0 if (len(kept) == e and normalise) else _pruned_error(block, x, y, c, kept, normalise)
        assert trial.error(mask) == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_greedy_removal_keeps_what_a_greedy_over_pruned_forwards_keeps(block: Any) -> None:
    x, y, modality = _data(block, 300, 1)
    e, keep = int(block.gate.weight.shape[0]), 4
    scores, info = greedy_removal_scores(block, x, y, modality, block.gate.top_k, True, keep)
    c = token_weights(y, "relative", modality)
    kept, errors = list(range(e)), []
    while len(kept) > keep:  # the same greedy, each trial a real forward of the pruned block
        trials = {j: _pruned_error(block, x, y, c, [k for k in kept if k != j], True) for j in kept}
        j = min(trials, key=lambda k: trials[k])
        kept.remove(j)
        errors.append(trials[j])
    assert sorted(torch.topk(scores, keep).indices.tolist()) == kept
    assert info["error_after_each_removal"] == pytest.approx(errors, rel=1e-3, abs=1e-6)


def test_an_expert_no_token_reaches_goes_first_at_no_cost(block: Any) -> None:
    b = copy.deepcopy(block)
    with torch.no_grad():
        b.gate.weight[3] = -10.0
    x, _, modality = _data(b, 200, 2)
    x = x.abs() + 0.1  # expert 3 logit far below every other: never in a token top-k
    with torch.no_grad():
        y = _moe(b, x)
    scores, info = greedy_removal_scores(b, x, y, modality, b.gate.top_k, True, keep=6)
    assert int(scores.argmin()) == 3
    assert info["error_after_each_removal"][0] == pytest.approx(0.0, abs=1e-9)


def test_recipe_errors() -> None:
    from omniedge.compress.prune import PruneSettings, PruneStage
    from omniedge.compress.stages import ModelFacts

    facts = ModelFacts(num_experts=8, top_k=2, moe_layers=(0, 1))
    with pytest.raises(OmniedgeError, match="cannot share one budget"):
        PruneStage(PruneSettings.parse({"method": "output", "budget": "global"}), facts)
    with pytest.raises(OmniedgeError, match="weighting max"):
        PruneStage(PruneSettings.parse({"method": "output", "weighting": "max"}), facts)
    with pytest.raises(OmniedgeError, match="token_weight"):
        PruneSettings.parse({"method": "reap", "token_weight": "residual"})
    stage = PruneStage(PruneSettings.parse({"method": "output"}), facts)
    assert stage.needs_inputs and stage.needs_moe_output


def test_pipeline_prunes_by_output_and_records_the_removal(tmp_path: Path) -> None:
    from omniedge.compress import pipeline
    from omniedge.models.registry import resolve_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
        tiny = resolve_checkpoint("tiny")
        recipe = {
            "stages": [{"prune": {"method": "output", "keep_ratio": 0.5}}],
            "calibration": {"source": "builtin", "samples": 6, "max_tokens": 64},
            "measure": {"texts": 2, "images": 1, "audios": 1, "max_tokens": 32},
        }
        out = pipeline.compress(tiny, tmp_path / "half", recipe, progress=False)
        result = json.loads((out / "omniedge.json").read_text())["stages"][0]["result"]
    removal = result["output_removal"]
    assert set(removal) == set(result["kept"]) == {"0", "1"}
    for layer, kept in result["kept"].items():
        assert len(kept) == result["experts_per_layer"][layer]
        assert len(removal[layer]["error_after_each_removal"]) == result["experts_before"] - len(kept)


def test_the_calibration_pass_records_what_the_next_layer_reads(tmp_path: Path) -> None:
    """`token_weight: residual` divides by ||h + y||^2 of each token: the calibration pass records it as the
    squared norm of the hidden state the next layer reads (checked on every MoE layer of a tiny compress that
    prunes by output with those weights)."""
    from omniedge.compress import layerwise, pipeline
    from omniedge.models.registry import resolve_checkpoint

    checked = []
    original = layerwise.run_layer

    def run_layer(*args: Any, **kw: Any) -> Any:
        out = original(*args, **kw)
        inputs = kw.get("inputs", args[7] if len(args) > 7 else None)
        if inputs is not None and inputs.residual_sq() is not None:
            want = torch.cat([h.reshape(-1, h.shape[-1]) for h in out]).float().square().sum(-1)
            torch.testing.assert_close(inputs.residual_sq(), want)
            checked.append(args[1])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
        mp.setattr(layerwise, "run_layer", run_layer)
        recipe = {
            "stages": [{"prune": {"method": "output", "keep_ratio": 0.5, "token_weight": "residual"}}],
            "calibration": {"source": "builtin", "samples": 6, "max_tokens": 64},
            "measure": {"texts": 2, "images": 1, "audios": 1, "max_tokens": 32},
        }
        out = pipeline.compress(resolve_checkpoint("tiny"), tmp_path / "res", recipe, progress=False)
    assert sorted(set(checked)) == [0, 1]
    result = json.loads((out / "omniedge.json").read_text())["stages"][0]
    assert result["settings"]["token_weight"] == "residual" and set(result["result"]["output_removal"]) == {
        "0",
        "1",
    }
