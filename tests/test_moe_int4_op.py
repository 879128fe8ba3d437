"""omniedge's fused INT4 MoE op (`ai.omniedge::MoEInt4`, kernels/moe_int4/) in the exporter and the runtime.

Without the library: `--moe-kernel omniedge` puts one MoEInt4 node per MoE layer in the thinker graph in place
of QMoE, the manifest names the library, and a runtime that cannot find it says which file and how to build it;
the exporter refuses the graphs the op cannot express and warns that a CPU bundle with it runs a slow reference
loop. With the library (built by kernels/moe_int4/build.py, CPU op only, when ONNX Runtime's C API header is at
$OMNIEDGE_ORT_INCLUDE and a C++ compiler is present; skipped otherwise): the op equals QMoE on the same weights,
and the tiny model's greedy tokens through it equal transformers' for text and for image + audio.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omniedge.errors import OmniedgeError

pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:--moe-kernel omniedge on the CPU")
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What do you see and hear?"


@pytest.fixture(scope="module")
def omniedge_bundle(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniedge.export.bundle import export_bundle

    return export_bundle(
        checkpoint, tmp_path_factory.mktemp("moe") / "b", moe_kernel="omniedge", progress=False
    )


@pytest.fixture(scope="module")
def ops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    include = os.environ.get("OMNIEDGE_ORT_INCLUDE")
    if not include or not (Path(include) / "onnxruntime_c_api.h").is_file():
        pytest.skip("set OMNIEDGE_ORT_INCLUDE to a folder with ONNX Runtime's onnxruntime_c_api.h")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("needs a C++ compiler")
    out = tmp_path_factory.mktemp("ops")
    build = [sys.executable, str(ROOT / "kernels/moe_int4/build.py"), "--cpu-only", "--ort-include", include]
    subprocess.run([*build, "-o", str(out / "libomniedge_moe_int4.so")], check=True)
    return out


def test_the_graph_has_one_moe_int4_node_per_moe_layer_and_the_manifest_names_the_library(
    omniedge_bundle: Path, bundle: Path
) -> None:
    import onnx

    def op_types(b: Path) -> list[str]:
        graph = onnx.load(str(b / "thinker.onnx"), load_external_data=False).graph
        return [f"{n.domain}::{n.op_type}" for n in graph.node if "MoE" in n.op_type]

    qmoe = op_types(bundle)
    assert qmoe and set(qmoe) == {"com.microsoft::QMoE"}
    assert op_types(omniedge_bundle) == ["ai.omniedge::MoEInt4"] * len(qmoe)
    graph = json.loads((omniedge_bundle / "manifest.json").read_text())["thinker_graph"]
    assert graph["moe_kernel"] == "omniedge" and graph["custom_ops"] == ["omniedge_moe_int4"]
    assert json.loads((bundle / "manifest.json").read_text())["thinker_graph"]["custom_ops"] == []


def test_a_runtime_without_the_library_says_where_it_looked_and_how_to_build_it(
    omniedge_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniedge.runtime.app import Omni

    monkeypatch.setenv("OMNIEDGE_OPS_DIR", str(tmp_path))
    with pytest.raises(OmniedgeError, match="omniedge_moe_int4") as err:
        Omni.load(omniedge_bundle)
    assert str(tmp_path / "libomniedge_moe_int4.so") in str(err.value)
    assert "build.py" in (err.value.fix or "") and "--moe-kernel qmoe" in (err.value.fix or "")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--define", "WARPS=8"], "is not a tuning macro"),
        (["--define", "OMNIEDGE_MOE_WARPS=eight"], "is not a tuning macro"),
        ([], "onnxruntime_c_api.h not found"),
    ],
)
def test_the_build_refuses_bad_input_with_the_fix(args: list[str], says: str, tmp_path: Path) -> None:
    build = [
        sys.executable,
        str(ROOT / "kernels/moe_int4/build.py"),
        "--cpu-only",
        "--ort-include",
        str(tmp_path),
    ]
    r = subprocess.run([*build, *args, "-o", str(tmp_path / "lib.so")], capture_output=True, text=True)
    assert r.returncode == 2 and says in r.stderr and "fix:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "lib.so").exists()


def test_graphs_the_op_cannot_express_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    from omniedge.export.bundle import export_bundle

    with pytest.raises(OmniedgeError, match="ort-flavour"):
        export_bundle(checkpoint, tmp_path / "p", flavour="portable", moe_kernel="omniedge", progress=False)
    with pytest.raises(OmniedgeError, match="unknown MoE kernel"):
        export_bundle(checkpoint, tmp_path / "u", moe_kernel="triton", progress=False)
    assert not (tmp_path / "p").exists() and not (tmp_path / "u").exists()
    with pytest.warns(UserWarning, match="reference loop"):  # a CPU bundle with the op: exact but slow
        export_bundle(checkpoint, tmp_path / "c", moe_kernel="omniedge", progress=False)


def _op_against_qmoe(lib: Path, provider: str, dtype: type, tokens: int, h: int, inter: int, e: int, k: int, g: int) -> float:  # fmt: skip
    """max |MoEInt4 - QMoE| / max |QMoE| on random weights, each op alone in a session of `provider`."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnx.helper import np_dtype_to_tensor_dtype

    rng = np.random.default_rng(0)
    weights = {
        "fc1": rng.integers(0, 256, (e, 2 * inter, h // 2), dtype=np.uint8),
        "s1": ((rng.random((e, 2 * inter, h // g)) + 0.5) / 40).astype(dtype),
        "fc2": rng.integers(0, 256, (e, h, inter // 2), dtype=np.uint8),
        "s2": ((rng.random((e, h, inter // g)) + 0.5) / 30).astype(dtype),
    }
    feeds = {
        "x": rng.standard_normal((tokens, h)).astype(dtype),
        "lg": rng.standard_normal((tokens, e)).astype(dtype),
    }
    elem = np_dtype_to_tensor_dtype(np.dtype(dtype))

    def run(op: str, domain: str, inputs: list[str], **attrs: object) -> np.ndarray:
        node = helper.make_node(op, inputs, ["y"], domain=domain, **attrs)
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info(n, elem, list(v.shape)) for n, v in feeds.items()],
            [helper.make_tensor_value_info("y", elem, [tokens, h])],
            [numpy_helper.from_array(v, n) for n, v in weights.items()],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)]
        )
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(lib))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=[provider])
        return sess.run(None, feeds)[0].astype(np.float32)

    ours = run("MoEInt4", "ai.omniedge", ["x", "lg", "fc1", "s1", "fc2", "s2"], k=k, group=g)
    qmoe_attrs = dict(
        k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0
    )
    qmoe_attrs.update(normalize_routing_weights=1, expert_weight_bits=4, block_size=g, weights_prepacked=0)
    ref = run("QMoE", "com.microsoft", ["x", "lg", "fc1", "s1", "", "fc2", "s2"], **qmoe_attrs)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_the_cpu_op_equals_qmoe_on_the_same_weights(ops_dir: Path) -> None:
    lib = ops_dir / "libomniedge_moe_int4.so"
    assert _op_against_qmoe(lib, "CPUExecutionProvider", np.float32, 3, 256, 96, 10, 3, 32) <= 1e-5


@pytest.mark.parametrize("kind", ["text", "image+audio"])
def test_the_tiny_model_through_the_op_answers_as_transformers(
    omniedge_bundle: Path, checkpoint: Path, ops_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omniedge.bench.parity import hf_greedy
    from omniedge.checkpoint import load_checkpoint
    from omniedge.runtime.app import Omni

    monkeypatch.setenv("OMNIEDGE_OPS_DIR", str(ops_dir))
    rng = np.random.default_rng(4)
    wave = (0.3 * np.sin(2 * np.pi * 220 * np.arange(20800) / 16000)).astype(np.float32)
    media = {"image": rng.integers(0, 256, (80, 60, 3), dtype=np.uint8), "audio": (wave, 16000)}
    media = media if kind == "image+audio" else {}
    with Omni.load(omniedge_bundle) as omni:
        got = omni.chat(PROMPT, max_new_tokens=10, **media).token_ids
        ref, _, _ = hf_greedy(
            load_checkpoint(checkpoint)[0], omni.preprocess(PROMPT, **media), omni.manifest.eos_token_ids, 10
        )
    assert got == ref


def test_the_op_graph_lays_out_the_qmoe_graphs_weights_file(
    bundle: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """So an H200 measurement can swap kernels over one exported weights file (bench/h200/graph_variant.py)."""
    import onnx

    from omniedge.export.thinker_ort import Options, export_thinker_ort
    from omniedge.weights import SafetensorsDir

    shutil.copytree(bundle, tmp_path / "b")
    base = tmp_path / "b" / "thinker.onnx"
    variant = tmp_path / "b" / "thinker.moe.onnx"
    cfg = json.loads((checkpoint / "config.json").read_text())
    nd = json.loads((tmp_path / "b" / "manifest.json").read_text())["text"]["num_deepstack"]
    opts = Options(moe_kernel="omniedge")
    export_thinker_ort(SafetensorsDir(checkpoint), cfg, variant, nd, opts, progress=False, data_of=base)

    def layout(path: Path) -> dict[str, tuple[str, ...]]:
        g = onnx.load(str(path), load_external_data=False).graph
        return {t.name: tuple(e.value for e in t.external_data) for t in g.initializer}

    assert layout(variant) == layout(base)
    assert not (tmp_path / "b" / "thinker.moe.onnx.data").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64])
def test_the_cuda_op_equals_qmoe_on_the_cuda_provider(tokens: int, tmp_path: Path) -> None:
    """float16 on ONNX Runtime's CUDA provider, one token (decode kernels) and 64 (prefill kernels)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu's CUDA libraries from their pip packages
        ort.preload_dlls()
    include = os.environ.get("OMNIEDGE_ORT_INCLUDE")
    if (
        "CUDAExecutionProvider" not in ort.get_available_providers()
        or not shutil.which("nvcc")
        or not include
    ):
        pytest.skip("needs onnxruntime-gpu, nvcc and OMNIEDGE_ORT_INCLUDE")
    lib = tmp_path / "libomniedge_moe_int4.so"
    build = [
        sys.executable,
        str(ROOT / "kernels/moe_int4/build.py"),
        "--ort-include",
        include,
        "--arch",
        "90",
    ]
    subprocess.run([*build, "-o", str(lib)], check=True)
    assert _op_against_qmoe(lib, "CUDAExecutionProvider", np.float16, tokens, 512, 256, 16, 4, 128) <= 1e-2
