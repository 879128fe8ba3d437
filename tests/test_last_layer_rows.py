"""`reconstruct` with `last_layer: text` (omniedge/compress/reconstruct.py): the last decoder layer's MoE output
reaches only the lm_head at the same position, read only at text positions, so its fit uses the text rows
alone, each request kind weighing the same; every other layer fits every row."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

from omniedge.compress.layer_inputs import LayerInputs
from omniedge.compress.prune import prune_block
from omniedge.compress.reconstruct import ReconstructSettings, ReconstructStage
from omniedge.compress.stages import LayerWork, ModelFacts
from omniedge.errors import OmniedgeError
from omniedge.models.family import MODALITIES, REQUEST_KINDS


@pytest.fixture(scope="module")
def layer() -> Any:
    from omniedge.models.family import thinker_parts
    from omniedge.models.tiny import build_tiny

    return thinker_parts(build_tiny(0)[0]).text_model.layers[1]


def _rows(layer: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, the unpruned block's outputs, modalities (text / image / audio in thirds) and request kinds
    (text rows of text, image and audio requests; media rows of their own request)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.mlp.gate.weight.shape[1], generator=g)
    with torch.no_grad():
        y = layer.mlp(x[None])[0]
    modality = torch.arange(n) % 3
    request = torch.where(modality == 0, torch.arange(n) // 3 % 3, modality)
    return x, y, modality, request


def _fit(layer: Any, index: int, rows: tuple[torch.Tensor, ...], last_layer: str) -> Any:
    """The pruned layer after the stage with `rows` recorded; ModelFacts says the model has 2 layers."""
    x, y, modality, request = rows
    lay = copy.deepcopy(layer)
    prune_block(lay.mlp, list(range(0, int(lay.mlp.gate.weight.shape[0]), 2)))
    inputs = LayerInputs(moe_output=True)
    inputs.add_moe(x, y, modality, None, request)
    settings = ReconstructSettings.parse({"fit": "block", "steps": 30, "last_layer": last_layer})
    facts = ModelFacts(num_experts=8, top_k=2, moe_layers=(0, 1), num_layers=2)
    stage = ReconstructStage(settings, facts)
    stage.apply(LayerWork(index, lay, f"thinker.model.layers.{index}.", None, inputs, 2, True))
    return lay, stage.layers[index]


def _same(a: Any, b: Any) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_last_layer_fit_ignores_media_rows(layer: Any) -> None:
    """In the last layer, what the image and audio rows hold changes nothing: the fit equals the fit on the
    text rows alone. In any other layer it does change the fit, and `all` fits every row in the last too."""
    x, y, modality, request = _rows(layer, 1200, 0)
    garbage = torch.where((modality > 0)[:, None], 50 * torch.randn_like(y), y)
    text = modality == MODALITIES.index("text")
    only_text = (x[text], y[text], modality[text], request[text])
    last, res = _fit(layer, 1, (x, garbage, modality, request), "text")
    reference, _ = _fit(layer, 1, only_text, "text")
    assert _same(last, reference)
    assert res["rows"] == int(text.sum()) < x.shape[0]
    first, res0 = _fit(layer, 0, (x, garbage, modality, request), "text")
    first_clean, _ = _fit(layer, 0, (x, y, modality, request), "text")
    assert res0["rows"] == x.shape[0] and not _same(first, first_clean)
    every, res_all = _fit(layer, 1, (x, garbage, modality, request), "all")
    assert res_all["rows"] == x.shape[0] and not _same(every, last)


def test_settings() -> None:
    assert ReconstructSettings.parse({}).last_layer == "all"
    assert ReconstructSettings.parse({"last_layer": "text"}).last_layer == "text"
    with pytest.raises(OmniedgeError, match=r"reconstruct\.last_layer"):
        ReconstructSettings.parse({"last_layer": "image"})


def test_pipeline_records_request_kinds_and_fits_the_last_layer_on_text(tmp_path: Any) -> None:
    from omniedge.compress import pipeline
    from omniedge.models.registry import resolve_checkpoint

    seen: dict[int, tuple[int, set[int]]] = {}
    apply = ReconstructStage.apply

    def spy(self: ReconstructStage, work: LayerWork) -> None:
        assert work.inputs is not None
        kinds = work.inputs.request_kinds()
        assert kinds is not None
        seen[work.index] = (int(kinds.shape[0]), {int(k) for k in kinds.unique()})
        apply(self, work)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIEDGE_HOME", str(tmp_path / "home"))
        mp.setattr(ReconstructStage, "apply", spy)
        recipe = {
            "stages": [
                {"prune": {"method": "reap", "keep_ratio": 0.5}},
                {"reconstruct": {"fit": "block", "steps": 10, "last_layer": "text"}},
            ],
            "calibration": {"source": "builtin", "samples": 6, "max_tokens": 64},
            "measure": {"texts": 2, "images": 1, "audios": 1, "max_tokens": 32},
        }
        out = pipeline.compress(resolve_checkpoint("tiny"), tmp_path / "half", recipe, progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    rec = next(s for s in meta["stages"] if s["name"] == "reconstruct")["result"]["calibration_error"]
    # every calibration row carries its request's kind; text, image and audio requests are all there
    assert {REQUEST_KINDS.index(k) for k in ("text", "image", "audio")} <= seen[0][1]
    assert rec["0"]["rows"] == seen[0][0]  # the first layer: every row
    assert 0 < rec["1"]["rows"] < seen[1][0]  # the last: its text rows only
