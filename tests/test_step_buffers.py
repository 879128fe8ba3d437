"""The decode step's input buffer (omniedge/runtime/step_buffers.py): one aligned buffer bound by address,
written in one copy; and the step's token read back (thinker_ort.StepOutput)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from omniedge.runtime.step_buffers import DecodeInputs

ort = pytest.importorskip("onnxruntime")


class RecordingIO:
    def __init__(self) -> None:
        self.bound: dict[str, tuple[Any, ...]] = {}

    def bind_input(
        self, name: str, device: str, device_id: int, dtype: Any, shape: list[int], ptr: int
    ) -> None:
        self.bound[name] = (device, device_id, dtype, shape, ptr)


def test_cpu_inputs_are_the_bound_memory_at_aligned_offsets() -> None:
    d = DecodeInputs(ort, "cpu", 6, np.float16)
    assert d.pos_at % 256 == 0 and d.seq_at % 256 == 0 and d.seq_at > d.pos_at >= 6 * 2
    io = RecordingIO()
    d.bind(io)
    base = d.bound.data_ptr()
    assert io.bound["inputs_embeds"] == ("cpu", 0, np.float16, [1, 1, 6], base)
    assert io.bound["position_ids"] == ("cpu", 0, np.int64, [1, 1], base + d.pos_at)
    assert io.bound["seqlens_k"] == ("cpu", 0, np.int32, [1], base + d.seq_at)
    d.write(np.arange(6, dtype=np.float32) / 4, 1234, 77)
    mem = d.bound.numpy()  # the OrtValue the graph reads, seen as bytes
    assert np.array_equal(mem[:12].view(np.float16), (np.arange(6) / 4).astype(np.float16))
    assert mem[d.pos_at : d.pos_at + 8].view(np.int64)[0] == 1234
    assert mem[d.seq_at : d.seq_at + 4].view(np.int32)[0] == 77
    assert d.how == "shared memory"
    d.write(np.full((1, 1, 6), 2.0, np.float32), 1, 0)  # a row in the graph's own shape is taken too
    assert np.array_equal(d.bound.numpy()[:12].view(np.float16), np.full(6, 2.0, np.float16))


def test_a_graph_reads_the_inputs_written_between_runs() -> None:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [
            helper.make_node("Cast", ["inputs_embeds"], ["e"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["e"], ["s"], keepdims=0),
            helper.make_node("Identity", ["position_ids"], ["p"]),
            helper.make_node("Identity", ["seqlens_k"], ["k"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16, [1, 1, 4]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, 1]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        ],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("p", TensorProto.INT64, [1, 1]),
            helper.make_tensor_value_info("k", TensorProto.INT32, [1]),
        ],
    )
    sess = ort.InferenceSession(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    d = DecodeInputs(ort, "cpu", 4, np.float16)
    io = sess.io_binding()
    d.bind(io)
    for name in ("s", "p", "k"):
        io.bind_output(name)
    for step in range(3):
        d.write(np.full(4, step + 0.5, np.float32), 100 + step, step)
        sess.run_with_iobinding(io)
        s, p, k = (o.numpy() for o in io.get_outputs())
        assert float(s) == 4 * (step + 0.5) and int(p.reshape(-1)[0]) == 100 + step and int(k[0]) == step


def test_on_a_device_one_update_inplace_moves_the_staged_bytes() -> None:
    d = DecodeInputs(ort, "cpu", 8, np.float16)
    d.bound = ort.OrtValue.ortvalue_from_shape_and_type([d.host.size], np.uint8, "cpu", 0)  # apart from host
    d.device = "cuda"  # as on a GPU: the bound buffer is not the staging memory
    d.write(np.full(8, 1.5, np.float32), 9, 3)
    got = d.bound.numpy()
    assert np.array_equal(got, d.host) and got[d.pos_at : d.pos_at + 8].view(np.int64)[0] == 9
    assert (
        d.how == "shared memory"
    )  # set at construction: what a real CUDA buffer reports is "update_inplace"


def test_the_token_is_read_from_the_bound_output() -> None:
    from omniedge.runtime.thinker_ort import StepOutput

    nxt = ort.OrtValue.ortvalue_from_numpy(np.array([3], np.int64))
    r = StepOutput(None, nxt)
    assert r.greedy() == 3
    nxt.update_inplace(np.array([151643], np.int64))
    assert r.greedy() == 151643
