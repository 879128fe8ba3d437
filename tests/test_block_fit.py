"""`reconstruct` with `fit: block` (omniedge/compress/block_fit.py): router, gate/up and down projections of
a pruned MoE block fitted to the unpruned block's output, on transformers' real MoE block of the tiny model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from omniedge.compress.block_fit import fit_block
from omniedge.compress.prune import prune_block
from omniedge.compress.reconstruct import ReconstructSettings
from omniedge.errors import OmniedgeError


@pytest.fixture(scope="module")
def block() -> Any:
    from omniedge.models.family import moe_blocks
    from omniedge.models.tiny import build_tiny

    return moe_blocks(build_tiny(0)[0])[0][1]


def _data(b: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, b.gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = b(x[None])[0]
    return x, y


def _rel_error(b: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        out = b(x[None])[0]
    return float((out - y).square().sum() / y.square().sum())


def test_with_every_expert_kept_nothing_changes(block: Any) -> None:
    b = copy.deepcopy(block)
    x, y = _data(b, 500, 0)
    before = {k: v.detach().clone() for k, v in b.named_parameters()}
    out = fit_block(b, x, y, torch.ones(x.shape[0]), steps=30, lr=1e-3, batch_tokens=128, check_every=10)
    assert out["held_out_before"] < 1e-10 and out["kept_step"] == 0
    for k, v in b.named_parameters():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_after_pruning_the_fit_lowers_the_error_and_writes_the_kept_weights(block: Any) -> None:
    b = copy.deepcopy(block)
    x, y = _data(b, 4000, 1)
    e = int(b.gate.weight.shape[0])
    prune_block(b, list(range(0, e, 2)))
    gate_before = b.gate.weight.detach().clone()
    held = torch.arange(x.shape[0]) % 5 == 4
    start_held = _rel_error(b, x[held], y[held])
    out = fit_block(b, x, y, torch.ones(x.shape[0]), steps=100, lr=3e-4, batch_tokens=512, check_every=25)
    assert out["held_out_before"] == pytest.approx(start_held, rel=1e-4)
    assert out["kept_step"] > 0
    assert out["held_out_after"] < 0.95 * out["held_out_before"]
    assert out["fitted_after"] < out["fitted_before"]
    # the block's own forward with the weights it now holds gives the errors the fit reported
    assert _rel_error(b, x[held], y[held]) == pytest.approx(out["held_out_after"], rel=1e-4)
    assert _rel_error(b, x[~held], y[~held]) == pytest.approx(out["fitted_after"], rel=1e-4)
    assert not torch.equal(b.gate.weight, gate_before)  # the router is fitted too


def test_token_weights_decide_which_tokens_count(block: Any) -> None:
    """A token with weight 0 does not count: the error on the weighted tokens alone is what is reported."""
    b = copy.deepcopy(block)
    x, y = _data(b, 1000, 2)
    e = int(b.gate.weight.shape[0])
    prune_block(b, list(range(0, e, 2)))
    c = (torch.arange(x.shape[0]) % 2 == 0).float()
    held = (torch.arange(x.shape[0]) % 5 == 4) & (c > 0)
    start = _rel_error(b, x[held], y[held])
    out = fit_block(b, x, y, c, steps=20, lr=1e-3, batch_tokens=256, check_every=10)
    assert out["held_out_before"] == pytest.approx(start, rel=1e-4)


def test_recipe_settings() -> None:
    s = ReconstructSettings.parse({"fit": "block", "steps": 10, "lr": 1e-3, "batch_tokens": 64})
    assert (s.fit, s.steps, s.lr, s.batch_tokens) == ("block", 10, 1e-3, 64)
    assert ReconstructSettings.parse({}).fit == "down"
    with pytest.raises(OmniedgeError, match=r"reconstruct\.fit"):
        ReconstructSettings.parse({"fit": "everything"})
    with pytest.raises(OmniedgeError, match=r"reconstruct\.steps"):
        ReconstructSettings.parse({"fit": "block", "steps": 0})


def test_pipeline_records_the_block_fit_and_the_report_shows_it(tmp_path: Any) -> None:
    import json

    from omniedge.compress import pipeline
    from omniedge.compress.report import rows
    from omniedge.models.registry import resolve_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
        stages = [
            {"prune": {"method": "reap", "keep_ratio": 0.5}},
            {"reconstruct": {"fit": "block", "steps": 20}},
        ]
        recipe = {
            "stages": stages,
            "calibration": {"source": "builtin", "samples": 6, "max_tokens": 64},
            "measure": {"texts": 2, "images": 1, "audios": 1, "max_tokens": 32},
        }
        out = pipeline.compress(resolve_checkpoint("tiny"), tmp_path / "half", recipe, progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    rec = next(s for s in meta["stages"] if s["name"] == "reconstruct")["result"]["calibration_error"]
    assert set(rec) == {"0", "1"}
    for v in rec.values():
        b = v["block"]
        assert b["steps"] == 20 and b["held_out_after"] <= b["held_out_before"]
    cols, body = rows(meta["layers"]["report"])
    at = cols.index("calibration error before -> after reconstruct")
    assert all("held out" in row[at] for row in body)


def test_fits_inference_tensors_and_under_no_grad(block: Any) -> None:
    """The pipeline records calibration rows and prunes under inference mode; the fit still trains."""
    b = copy.deepcopy(block)
    with torch.inference_mode():
        x, y = _data(b, 1500, 3)
        prune_block(b, list(range(0, int(b.gate.weight.shape[0]), 2)))
    with torch.no_grad():
        out = fit_block(b, x, y, torch.ones(x.shape[0]), steps=10, lr=3e-4, batch_tokens=256, check_every=5)
    assert out["fitted_after"] < out["fitted_before"]
