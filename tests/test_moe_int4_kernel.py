"""The fused INT4 MoE kernels (kernels/moe_int4/) on a CUDA GPU: built with nvcc, every output within 5e-3 of
the largest output of a float32 reference (omniedge.int4.dequantize, QMoE's routing, SwiGLU) at the thinker's
shape for 1 and 3 tokens (decode kernels) and 64 and 300 (prefill kernels), and at widths that are not powers
of two for 1, 3 and 40 tokens (decode kernels: the prefill ones take multiples of 64); shapes no kernel takes
are refused without a launch; NaN router logits rank as -inf (a token whose logits are all NaN gets the first k
experts, equally weighted) in both kernel families, without a fault. Run on the device machine: `python3 -m pytest -q -m gpu tests/test_moe_int4_kernel.py`."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or shutil.which("nvcc") is None:
        pytest.skip("needs a CUDA GPU and nvcc")
    path = Path(__file__).resolve().parents[1] / "bench" / "h200" / "moe_kernel_lib.py"
    mod = SimpleNamespace(**runpy.run_path(str(path)))
    mod.fused = mod.FusedMoE(mod.build(tmp_path_factory.mktemp("moe_int4")))
    return mod


def test_fused_moe_matches_the_float32_reference(probe: Any) -> None:
    import torch

    gen = torch.Generator(device="cuda").manual_seed(1)
    odd = {"E": 40, "k": 6, "H": 1056, "I": 352, "group": 32}
    rows = probe.check(probe.fused, [(probe.SHAPE, (1, 3, 64, 300)), (odd, (1, 3, 40))], gen)
    assert len(rows) == 7 and all(r["max_error_over_max"] < 5e-3 for r in rows), rows


def test_nan_router_logits_rank_last(probe: Any) -> None:
    import torch

    rows = probe.check_nan_logits(
        probe.fused, probe.SHAPE, (3, 20), torch.Generator(device="cuda").manual_seed(2)
    )
    assert len(rows) == 2 and all(r["max_error_over_max"] < 5e-3 for r in rows), rows


def test_shapes_the_kernels_do_not_take_are_refused(probe: Any) -> None:
    import torch

    sh = dict(probe.SHAPE)
    w = probe.random_layer(sh["E"], sh["H"], sh["I"], sh["group"], torch.Generator(device="cuda"))
    x = torch.zeros(1, sh["H"], dtype=torch.float16, device="cuda")
    logits = torch.zeros(1, sh["E"], dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="returned 1"):
        probe.fused(x, logits, w, torch.empty_like(x), sh["E"] + 1, sh["group"])  # k > E
    with pytest.raises(RuntimeError, match="returned 1"):
        probe.fused(x, logits, w, torch.empty_like(x), sh["k"], 48)  # group not a multiple of 32
