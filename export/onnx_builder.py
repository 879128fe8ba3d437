"""Build an ONNX graph node by node, streaming initializers into one external-data file as they come.

The hand-built thinker graph (export/thinker_ort.py) is made with this instead of torch.onnx.export: its
weights come straight from a checkpoint's packed INT4 tensors, one at a time, so no float copy of any
expert and no whole model is ever in memory. Each initializer is written to `<graph>.data` (aligned, so
ONNX Runtime can map it) the moment it is added; only small tensors stay inline.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # opset 21 needs IR >= 10; ONNX Runtime 1.20 (JetPack 6 wheels) reads up to 10
OPSET = 21
MS_DOMAIN = "com.microsoft"
INLINE_BYTES = 1024  # smaller initializers stay in the .onnx file
ALIGN = 4096

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def onnx_dtype(dtype: Any) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


class GraphBuilder:
    """Nodes, inputs, outputs and initializers of one graph; `save` writes `path` (+ `path.data`)."""

    def __init__(self, name: str, path: Path, data_path: Path | None = None, write_data: bool = True) -> None:
        """`data_path`: the external-data file (default `<path>.data`); `write_data=False` lays out the same
        offsets without writing, for a second graph over an existing data file (a variant of the same weights)."""
        self.name = name
        self.path = Path(path)
        self.data_path = Path(data_path) if data_path else self.path.with_name(self.path.name + ".data")
        self.write_data = write_data
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._counter = 0
        self._data: io.BufferedWriter | None = None
        self._offset = 0
        self.weight_bytes = 0
        self.sizes: dict[str, int] = {}  # initializer name -> bytes

    # ------------------------------------------------------------ values

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, name: str, dtype: Any, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))
        return name

    def output(self, name: str, dtype: Any, shape: list[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; bytes past INLINE_BYTES go to the external-data file right away."""
        if name in self._names:
            raise ValueError(f"initializer {name} added twice")
        self._names.add(name)
        a = np.ascontiguousarray(array)
        self.weight_bytes += a.nbytes
        self.sizes[name] = int(a.nbytes)
        if a.nbytes <= INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(a, name))
            return name
        if self._data is None and self.write_data:
            self._data = open(self.data_path, "wb")  # noqa: SIM115 (closed in save)
        pad = (-self._offset) % ALIGN
        if pad:
            if self._data is not None:
                self._data.write(b"\0" * pad)
            self._offset += pad
        if self._data is not None:
            self._data.write(a.tobytes())
        t = TensorProto(name=name, data_type=onnx_dtype(a.dtype), dims=list(a.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (
            ("location", self.data_path.name),
            ("offset", str(self._offset)),
            ("length", str(a.nbytes)),
        ):
            e = t.external_data.add()
            e.key, e.value = k, v
        self._offset += a.nbytes
        self.initializers.append(t)
        return name

    def ints(self, values: list[int] | tuple[int, ...], hint: str = "shape") -> str:
        """A small int64 constant (shapes, axes, indices), deduplicated by value."""
        key = f"c_{hint}_" + "_".join(str(v).replace("-", "m") for v in values)
        if key not in self._names:
            self.const(key, np.asarray(values, dtype=np.int64))
        return key

    def scalar(self, value: float, dtype: Any, hint: str = "s") -> str:
        key = f"c_{hint}_{np.dtype(dtype).name}_{value!r}".replace("-", "m").replace(".", "p")
        if key not in self._names:
            self.const(key, np.asarray(value, dtype=dtype))
        return key

    # ------------------------------------------------------------ nodes

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        domain: str = "",
        name: str | None = None,
        **attrs: Any,
    ) -> Any:
        """Add a node; returns its output name (or a list of names when n_out > 1)."""
        base = name or self.fresh(op_type.lower())
        outs = [base] if n_out == 1 else [f"{base}.{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_into(
        self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any
    ) -> None:
        """Add a node whose outputs have given names (graph outputs)."""
        self.nodes.append(
            helper.make_node(
                op_type, inputs, outputs, name=self.fresh(op_type.lower()), domain=domain, **attrs
            )
        )

    # ------------------------------------------------------------ save

    def save(self, doc: str = "") -> Path:
        if self._data is not None:
            self._data.close()
            self._data = None
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers, doc_string=doc
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION,
            producer_name="omniedge",
        )
        with open(self.path, "wb") as f:
            f.write(model.SerializeToString())
        return self.path
