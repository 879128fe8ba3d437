"""`omniedge build`: a clear error without TensorRT, INT4 graphs reported and skipped, profiles from the
manifest, and (when tensorrt_rtx is installed: its builder runs without a GPU) the exported graphs parse
and build in a real TensorRT builder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from omniedge.cli import main
from omniedge.errors import OmniedgeError
from omniedge.export.trt_build import build_bundle, build_cli, dim_ranges, profiles_for

THINKER_INPUTS = [
    {"name": "inputs_embeds", "shape": [1, "seq", 128], "dtype": "float32"},
    {"name": "position_ids", "shape": [3, 1, "seq"], "dtype": "int64"},
    {"name": "past_key_values.0.key", "shape": [1, 2, "past", 32], "dtype": "float32"},
]
AUDIO_INPUTS = [
    {"name": "padded_features", "shape": ["num_chunks", 128, "chunk_frames"], "dtype": "float32"},
    {"name": "valid_indices", "shape": ["num_tokens"], "dtype": "int64"},
]
PREPROCESS = {
    "audio": {
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_window": 50,
        "max_seconds": 30,
        "chunk_frames": 100,
        "tokens_per_chunk": 13,
    }
}


def _manifest(components: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "builder": {"omniedge": "0.1.0"},
        "text": {"max_position_embeddings": 65536},
        "preprocess": PREPROCESS,
        "components": components,
    }


def _write_bundle(root: Path, graphs: dict[str, Any], inputs: dict[str, list[dict[str, Any]]]) -> Path:
    import onnx

    root.mkdir(parents=True, exist_ok=True)
    comps = {}
    for name, model in graphs.items():
        onnx.save(model, str(root / f"{name}.onnx"))
        comps[name] = {"onnx": f"{name}.onnx", "engine": None, "inputs": inputs[name], "outputs": []}
    (root / "manifest.json").write_text(json.dumps(_manifest(comps)))
    return root


def _int4_graph() -> Any:
    """A one-node graph with com.microsoft.MatMulNBits, as an INT4 bundle's thinker has."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(
        "MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=128, N=8, bits=4, block_size=128
    )
    g = helper.make_graph(
        [node],
        "int4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.zeros((8, 1, 64), np.uint8), "B"),
            numpy_helper.from_array(np.ones(8, np.float32), "S"),
        ],
    )
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def test_missing_tensorrt_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    bundle = _write_bundle(tmp_path / "b", {"thinker": _int4_graph()}, {"thinker": THINKER_INPUTS})
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a host without TensorRT
    with pytest.raises(OmniedgeError) as e:
        build_cli(bundle)
    assert "TensorRT is not installed" in e.value.problem
    assert "L4T" in (e.value.fix or "") and "omniedge[trt]" in (e.value.fix or "")
    assert main(["build", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "fix:" in err and "Traceback" not in err


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="not an engine bundle"):
        build_cli(tmp_path)


def test_int4_graphs_are_reported_and_skipped(tmp_path: Path) -> None:
    """Contrib ops are detected before TensorRT is touched: this fake has no builder at all."""
    pytest.importorskip("onnx")
    bundle = _write_bundle(tmp_path / "b", {"thinker": _int4_graph()}, {"thinker": THINKER_INPUTS})
    fake_trt = SimpleNamespace(__name__="tensorrt", __version__="10.3.0")
    result = build_bundle(bundle, trt=fake_trt)  # type: ignore[arg-type]
    assert result["thinker"].startswith("skipped: uses com.microsoft.MatMulNBits")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["components"]["thinker"]["engine"] is None
    assert "MatMulNBits" in m["components"]["thinker"]["engine_skipped"]
    assert m["builder"]["tensorrt"] == "10.3.0"


def test_profiles_come_from_the_manifest() -> None:
    ranges = dim_ranges(_manifest({}), max_context=2048)
    audio = profiles_for({"inputs": AUDIO_INPUTS}, ranges)
    assert list(audio) == ["default"]
    assert audio["default"]["padded_features"] == ((1, 128, 1), (4, 128, 100), (30, 128, 100))  # 30 s max
    assert audio["default"]["valid_indices"] == ((1,), (52,), (390,))  # 13 tokens per chunk
    thinker = profiles_for({"inputs": THINKER_INPUTS}, ranges)
    assert list(thinker) == ["prefill", "decode"]
    assert thinker["prefill"]["inputs_embeds"] == ((1, 1, 128), (1, 512, 128), (1, 2048, 128))
    assert thinker["decode"]["inputs_embeds"] == ((1, 1, 128),) * 3
    assert thinker["decode"]["past_key_values.0.key"] == ((1, 2, 0, 32), (1, 2, 1024, 32), (1, 2, 2047, 32))
    assert profiles_for({"inputs": [{"name": "pixel_values", "shape": [16, 1536]}]}, ranges) == {}
    with pytest.raises(OmniedgeError, match="no range for"):
        profiles_for({"inputs": [{"name": "x", "shape": ["mystery"]}]}, ranges)


def test_tensorrt_rtx_parses_and_builds_exported_graphs(tmp_path: Path) -> None:
    """TensorRT-RTX's builder runs on a CPU-only machine: parse and build the real exported vision, audio
    and thinker graphs (fp32 tiny model; the thinker's MoE layers are ONNX Ifs) with the profiles
    `omniedge build` would use."""
    trt = pytest.importorskip("tensorrt_rtx")
    pytest.importorskip("torch")
    from omniedge.export.audio import export_audio
    from omniedge.export.int4_graph import module_names, translation_table
    from omniedge.export.onnx_io import component_record
    from omniedge.export.thinker import export_thinker
    from omniedge.export.trt_build import build_engine
    from omniedge.export.vision import default_image_size, export_vision
    from omniedge.models.family import thinker_parts
    from omniedge.models.tiny import build_tiny

    model, _ = build_tiny()
    parts, names, table = thinker_parts(model), module_names(model), translation_table()
    export_vision(
        parts.visual, names, None, default_image_size(parts.visual.config), tmp_path / "vision.onnx", table
    )
    export_audio(parts.audio_tower, names, None, tmp_path / "audio.onnx", table)
    deepstack = len(parts.visual.config.deepstack_visual_indexes)
    export_thinker(parts.text_model, parts.lm_head, deepstack, names, None, tmp_path / "thinker.onnx", table)
    ranges = dim_ranges(_manifest({}))
    for name in ("vision", "audio", "thinker"):
        path = tmp_path / f"{name}.onnx"
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)  # keep builder and network alive while the parser works
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(path)), [
            parser.get_error(i).desc() for i in range(parser.num_errors)
        ]
        engine = build_engine(trt, path, profiles_for(component_record(path, tmp_path), ranges))
        assert len(engine) > 100_000
