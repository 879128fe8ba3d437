"""The `reconstruct` stage (omniedge/compress/reconstruct.py): the kept experts' down projections re-fitted to
the unpruned block's output, on transformers' real MoE block of the tiny model, and through the pipeline."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from omniedge.compress.moe import moe_forward, route
from omniedge.compress.prune import prune_block
from omniedge.compress.reconstruct import refit_down


@pytest.fixture(scope="module")
def block() -> Any:
    from omniedge.models.family import moe_blocks
    from omniedge.models.tiny import build_tiny

    return moe_blocks(build_tiny(0)[0])[0][1]


def _moe(b: Any, x: torch.Tensor) -> torch.Tensor:
    e = b.experts
    return moe_forward(x, b.gate.weight, e.gate_up_proj, e.down_proj, b.gate.top_k, True, e.act_fn)


def _tokens(b: Any, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, b.gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))


def test_with_every_expert_kept_the_trained_weights_come_back(block: Any) -> None:
    b = copy.deepcopy(block)
    x = _tokens(b, 300, 0)
    with torch.no_grad():
        y = _moe(b, x)
    before = b.experts.down_proj.detach().clone()
    for damp in (0.01, None):  # fixed, and chosen on held-out tokens
        out = refit_down(b, x, y, b.gate.top_k, True, damp=damp, sweeps=3)
        assert out["error_before"] < 1e-10 and out["error_after"] < 1e-10
        torch.testing.assert_close(b.experts.down_proj, before, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("token_weight", ["uniform", "relative"])
def test_after_pruning_the_fit_is_the_joint_ridge_solution(block: Any, token_weight: str) -> None:
    """Block coordinate descent over experts ends at the closed-form (token-weighted) ridge solution over all
    kept experts' down projections at once, and the block's own forward then gives that fit's output."""
    b = copy.deepcopy(block)
    top_k = b.gate.top_k
    x = _tokens(b, 600, 1)
    with torch.no_grad():
        y = _moe(b, x)
    e = int(b.gate.weight.shape[0])
    prune_block(b, list(range(0, e, 2)))
    b.gate.num_experts = e // 2
    trained = b.experts.down_proj.detach().clone()  # [E', H, I]
    damp = 0.05
    out = refit_down(b, x, y, top_k, True, damp=damp, sweeps=60, token_weight=token_weight)
    assert out["error_after"] < out["error_before"]

    # the same objective solved directly: features [T, E' * I], one ridge weight per expert block
    ex = b.experts
    kept, hidden, inter = trained.shape
    r = route(x, b.gate.weight, top_k, True)
    phi = torch.zeros(x.shape[0], kept, inter, dtype=torch.float64)
    for j, a, c in r.spans():
        tok, slot = r.token[a:c], r.slot[a:c]
        g, u = F.linear(x[tok], ex.gate_up_proj[j]).chunk(2, dim=-1)
        phi[tok, j] = ((ex.act_fn(g) * u) * r.weights[tok, slot, None]).double().detach()
    sq = y.double().square().sum(-1)
    c = torch.ones_like(sq) if token_weight == "uniform" else 1 / (sq + sq.mean())  # each token's weight
    phi *= c.sqrt()[:, None, None]
    lam = torch.stack([damp * torch.diagonal(phi[:, j].T @ phi[:, j]).mean() for j in range(kept)])
    flat = phi.reshape(x.shape[0], -1)
    ridge = torch.diag(lam.repeat_interleave(inter))
    d0 = trained.double().permute(0, 2, 1).reshape(kept * inter, hidden)  # stacked D_e^T
    want = torch.linalg.solve(flat.T @ flat + ridge, flat.T @ (y.double() * c.sqrt()[:, None]) + ridge @ d0)
    got = b.experts.down_proj.double().permute(0, 2, 1).reshape(kept * inter, hidden)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-4)
    with torch.no_grad():
        err = float(((_moe(b, x) - y).double().square().sum(-1) * c).sum() / (sq * c).sum())
    assert err == pytest.approx(out["error_after"], rel=1e-3)


def test_pipeline_records_each_layer_and_keep_all_stays_exact(tmp_path: Path) -> None:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress import pipeline
    from omniedge.compress.report import rows
    from omniedge.models.registry import resolve_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
        tiny = resolve_checkpoint("tiny")
        calib = {"source": "builtin", "samples": 6, "max_tokens": 64}
        measure = {"texts": 2, "images": 1, "audios": 1, "max_tokens": 32}

        def run(keep: float, name: str) -> tuple[Path, dict[str, Any]]:
            stages = [{"prune": {"method": "reap", "keep_ratio": keep}}, {"reconstruct": {}}]
            recipe = {"stages": stages, "calibration": calib, "measure": measure}
            out = pipeline.compress(tiny, tmp_path / name, recipe, progress=False)
            return out, json.loads((out / "omniedge.json").read_text())

        _, meta = run(0.5, "half")
        rec = next(s for s in meta["stages"] if s["name"] == "reconstruct")["result"]["calibration_error"]
        assert set(rec) == {"0", "1"}
        assert all(v["error_after"] < v["error_before"] for v in rec.values())
        cols, body = rows(meta["layers"]["report"])  # what `omniedge compress --report` prints
        at = cols.index("calibration error before -> after reconstruct")
        assert [row[at] for row in body] == [
            f"{rec[k]['error_before']:.2e} -> {rec[k]['error_after']:.2e}" for k in ("0", "1")
        ]
        assert "out err reconstruct" in cols

        same, _ = run(1.0, "same")
        teacher, tok = load_checkpoint(tiny)
        student, _ = load_checkpoint(same)
        ids = torch.tensor([tok.encode("Red circle, blue square: count the shapes.").ids])
        with torch.inference_mode():
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
            a, b = (m.thinker(**inputs).logits for m in (student, teacher))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_each_modality_weighs_the_same_in_total() -> None:
    from omniedge.compress.reconstruct import token_weights

    y = torch.randn(100, 8, generator=torch.Generator().manual_seed(3))
    y[0] *= 1000  # one huge output
    modality = torch.tensor([0] * 90 + [2] * 10)  # text and audio; no image
    resid_sq = torch.rand(100, generator=torch.Generator().manual_seed(4)) * 50 + 1
    for how in ("uniform", "relative", "residual"):
        plain, balanced = token_weights(y, how, None, resid_sq), token_weights(y, how, modality, resid_sq)
        assert float(balanced[:90].sum()) == pytest.approx(float(balanced[90:].sum()), rel=1e-5)
        assert float(balanced.sum()) == pytest.approx(float(plain.sum()), rel=1e-5)
        # within a modality the proportions stay as the token weighting made them
        torch.testing.assert_close(balanced[:90] / balanced[1], plain[:90] / plain[1])
    rel = token_weights(y, "relative")
    assert float(rel[0]) < float(rel[1:].min())  # the huge output counts relative to its own size
    torch.testing.assert_close(token_weights(y, "residual", None, resid_sq), 1.0 / resid_sq)
    with pytest.raises(ValueError, match="resid_sq"):
        token_weights(y, "residual")


def test_auto_damp_is_the_one_that_does_best_on_held_out_tokens(block: Any) -> None:
    from omniedge.compress.reconstruct import DAMP_GRID

    b = copy.deepcopy(block)
    x = _tokens(b, 500, 4)
    with torch.no_grad():
        y = _moe(b, x)
    e = int(b.gate.weight.shape[0])
    prune_block(b, list(range(e // 2)))
    b.gate.num_experts = e // 2
    fixed = copy.deepcopy(b)
    out = refit_down(b, x, y, b.gate.top_k, True, damp=None, sweeps=2)
    trials = out["held_out_fifth"]
    assert set(trials) == {"none", *(str(d) for d in DAMP_GRID)}
    assert out["damp"] == min(trials, key=lambda k: trials[k])
    if out["damp"] == "none":
        torch.testing.assert_close(b.experts.down_proj, fixed.experts.down_proj)
    else:  # then fitted on every token with that damp
        again = refit_down(fixed, x, y, b.gate.top_k, True, damp=float(out["damp"]), sweeps=2)
        torch.testing.assert_close(b.experts.down_proj, fixed.experts.down_proj)
        assert again["error_after"] == out["error_after"] < out["error_before"]
