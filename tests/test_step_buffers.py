"""The decode step's input buffer and token reader (omniedge/runtime/step_buffers.py): one aligned buffer bound
by address, written in one copy; the token read into a fixed array; the CUDA runtime found in the process's
mappings or not used at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from omniedge.errors import OmniedgeError
from omniedge.runtime.step_buffers import CudaCopy, DecodeInputs, TokenReader

ort = pytest.importorskip("onnxruntime")


class RecordingIO:
    def __init__(self) -> None:
        self.bound: dict[str, tuple[Any, ...]] = {}

    def bind_input(
        self, name: str, device: str, device_id: int, dtype: Any, shape: list[int], ptr: int
    ) -> None:
        self.bound[name] = (device, device_id, dtype, shape, ptr)


class MemcpyLog:
    """Stands in for CudaCopy: does the copy with numpy, records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def to_device(self, dst_ptr: int, host: np.ndarray) -> None:
        self.calls.append(("to_device", dst_ptr, host.nbytes))

    def to_host(self, host: np.ndarray, src_ptr: int) -> None:
        self.calls.append(("to_host", src_ptr, host.nbytes))
        host[...] = 11


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


def test_without_a_copier_one_update_inplace_moves_the_staged_bytes() -> None:
    d = DecodeInputs(ort, "cpu", 8, np.float16)
    d.bound = ort.OrtValue.ortvalue_from_shape_and_type([d.host.size], np.uint8, "cpu", 0)  # apart from host
    d.device = "cuda"  # as on a GPU: the bound buffer is not the staging memory
    d.write(np.full(8, 1.5, np.float32), 9, 3)
    got = d.bound.numpy()
    assert np.array_equal(got, d.host) and got[d.pos_at : d.pos_at + 8].view(np.int64)[0] == 9
    assert (
        d.how == "shared memory"
    )  # set at construction: what a real CUDA buffer reports is "update_inplace"
    assert DecodeInputs(ort, "cpu", 8, np.float16, None).how == "shared memory"


def test_device_inputs_go_in_one_copy_and_the_token_through_the_copier() -> None:
    log = MemcpyLog()
    d = DecodeInputs(ort, "cpu", 8, np.float16, log)  # a CPU buffer stands in for device memory
    d.device = "cuda"
    d.write(np.ones(8, np.float32), 5, 4)
    assert log.calls == [("to_device", d.bound.data_ptr(), d.host.nbytes)]
    nxt = ort.OrtValue.ortvalue_from_numpy(np.array([3], np.int64))
    r = TokenReader(nxt, "cuda", log)  # type: ignore[arg-type]
    assert r.read() == 11 and log.calls[-1] == ("to_host", nxt.data_ptr(), 8) and r.how == "cudaMemcpy"
    plain = TokenReader(nxt, "cuda", None)
    assert plain.read() == 3 and plain.how == "numpy"
    assert TokenReader(nxt, "cpu", log).how == "numpy"  # type: ignore[arg-type]


def test_cuda_runtime_is_used_only_when_asked_and_exactly_one_is_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /a/libcudart.so.12\n")
    assert CudaCopy.loaded(maps) is None  # opt-in only: nothing is looked at without OMNIEDGE_CUDA_MEMCPY=1
    monkeypatch.setenv("OMNIEDGE_CUDA_MEMCPY", "1")
    for text, found in (
        ("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n", 0),
        ("7f00-7f01 r-xp 0 08:01 1 /a/libcudart.so.12\n7f02-7f03 r-xp 0 08:01 2 /b/libcudart.so.13\n", 2),
        ("7f00-7f01 r-xp 0 08:01 1 /nonexistent/libcudart.so.13\n", 1),  # cannot be opened
    ):
        maps.write_text(text)
        with pytest.warns(UserWarning, match=f"no single CUDA runtime library to call [(]{found} mapped"):
            assert CudaCopy.loaded(maps) is None
    with pytest.warns(UserWarning, match="onnxruntime's own calls do the copies"):
        assert CudaCopy.loaded(tmp_path / "missing") is None

    class Recorder:  # records what the CUDA runtime would be asked
        def __init__(self, fail_empty: bool) -> None:
            self.argtypes: Any = None
            self.restype: Any = None
            self.fail_empty = fail_empty

        def __call__(self, *args: Any) -> int:
            calls.append(args)
            return 1 if self.fail_empty and args[2] == 0 else 0  # an error for the empty copy below

    calls: list[tuple[Any, ...]] = []

    class Lib:
        cudaMemcpy = Recorder(fail_empty=True)
        cudaStreamSynchronize = Recorder(fail_empty=False)

    opened: list[str] = []
    monkeypatch.setattr("ctypes.CDLL", lambda path: opened.append(path) or Lib())
    maps.write_text(
        "7f00-7f01 r-xp 0 08:01 1 /a/libcudart.so.12\n7f01-7f02 r--p 0 08:01 1 /a/libcudart.so.12\n"
    )
    cc = CudaCopy.loaded(maps)
    assert cc is not None and opened == ["/a/libcudart.so.12"]
    host = np.zeros(3, np.int64)
    cc.to_device(1000, host)
    cc.to_host(host, 2000)
    # to the device: the copy, then the legacy stream synchronized; to the host: the copy alone
    assert calls == [(1000, host.ctypes.data, 24, 1), (None,), (host.ctypes.data, 2000, 24, 2)]
    with pytest.raises(OmniedgeError, match="cudaMemcpy failed with CUDA error 1"):
        cc.to_host(np.zeros(0, np.int64), 2000)
