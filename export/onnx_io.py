"""Shared export plumbing: one torch.onnx.export call for every graph, checks, sizes, hashes, I/O specs.

Every graph goes through `export_graph` so opset, exporter and the external-data rule are the same
everywhere; the manifest reads each graph's inputs/outputs back from the saved file, never from intent.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omniedge.checkpoint import file_sha256
from omniedge.errors import OmniedgeError

OPSET = 21  # blocked DequantizeLinear (the later TensorRT INT4 flavour) needs 21; ORT >= 1.20 runs it
# A protobuf file cannot exceed 2 GiB: larger graphs keep their weights in a sibling .data file.
EXTERNAL_DATA_BYTES = 1_800_000_000

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints its steps and torchvision notices; our progress bar says what is going on."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def export_graph(
    module: Any,
    args: tuple[Any, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any = None,
    custom_translation_table: Mapping[Any, Callable[..., Any]] | None = None,
) -> Path:
    """torch.onnx.export (dynamo) of `module` at opset 21 to `path`; weights go external past ~1.8 GB."""
    import torch

    module.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=dict(custom_translation_table or {}),
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; keep its message, add ours
        raise OmniedgeError(
            f"torch.onnx.export failed for {path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            "this transformers/torch pair may be unsupported; omniedge is tested with torch 2.11-2.13 and "
            "transformers 5.17-5.24",
        ) from e
    assert program is not None
    big = sum(int(t.numel()) * t.element_size() for t in module.state_dict().values()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=big)
    return path


def check_graph(path: Path) -> None:
    """onnx's structural checker (by path, so external data works); contrib ops are declared in int4_graph."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise OmniedgeError(
            f"exported {path.name} is not a valid ONNX graph: {e}", "report this as a bug"
        ) from e


def graph_files(path: Path) -> list[Path]:
    """The .onnx file and any external-data files it references (what the manifest hashes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for t in model.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                files.add(path.parent / kv.value)
    return sorted(files)


def weight_bytes(path: Path) -> int:
    """Bytes of every initializer (stored dtype: INT4 weights count as packed uint8)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def io_specs(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as manifest entries: name, shape (symbolic dims as strings), dtype."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(v: Any) -> dict[str, Any]:
        tt = v.type.tensor_type
        shape: list[int | str] = [
            d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tt.shape.dim
        ]
        return {"name": v.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def rename_dims(path: Path, names: Mapping[str, str]) -> None:
    """Give the exporter's symbolic dims (s0, s27, ...) the contract's names (seq, past, ...), in place."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                p = d.dim_param
                if p in names:
                    d.dim_param = names[p]
                    continue
                for old, new in sorted(names.items(), key=lambda kv: -len(kv[0])):
                    p = _replace_symbol(p, old, new)
                d.dim_param = p
    onnx.save(model, str(path))


def _replace_symbol(expr: str, old: str, new: str) -> str:
    import re

    return re.sub(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])", new, expr)


def component_record(path: Path, bundle: Path) -> dict[str, Any]:
    """The manifest's entry for one exported graph (engine filled in later by `omniedge build`)."""
    inputs, outputs = io_specs(path)
    return {
        "onnx": path.name,
        "engine": None,
        "inputs": inputs,
        "outputs": outputs,
        "weight_bytes": weight_bytes(path),
        "sha256": {str(f.relative_to(bundle)): file_sha256(f) for f in graph_files(path)},
    }


def rotate_half(x: Any) -> Any:
    """The rotary-embedding half swap both graph wrappers use (thinker M-RoPE and vision RoPE)."""
    import torch

    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
