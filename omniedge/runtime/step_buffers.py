"""A decode step's inputs and its token: one copy to the device, one read back.

A decode step needs three small inputs (the new token's embedding row, its rotary position, the cache length)
and gives back one token id. On CUDA every copy between host and device is a synchronous call that costs far
more than its bytes, and the GPU waits through each: on the H200 (30B thinker, 3.05 ms per step) three
`OrtValue.update_inplace` calls took 49 us and reading the token with `OrtValue.numpy()` 35 us per step
(bench/h200/step_probe.py; bench/results/2026-12-01-h200-decode-rounds.md). So the three inputs live in
one device buffer at fixed offsets, bound to the graph by address (the captured CUDA graph replays on those
addresses) and written from one host staging buffer by one `update_inplace`; the token is read with
`numpy()`. On the CPU the staging buffer is the bound buffer itself: nothing is copied.

`OMNIEDGE_CUDA_MEMCPY=1` (opt-in: not yet measured on a GPU) makes both copies plain `cudaMemcpy` calls (the token
into a fixed host array) through the CUDA runtime library onnxruntime has loaded (found in the process's own mappings, never a second
copy of the library), the copy to the device followed by a synchronize of the stream it ran on, so its DMA
has landed before onnxruntime's own stream reads the buffer.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError

_ALIGN = 256  # each input starts on its own 256-byte boundary, as device allocations do
_TO_DEVICE, _TO_HOST = 1, 2  # cudaMemcpyKind
ENABLE_ENV = "OMNIEDGE_CUDA_MEMCPY"


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class CudaCopy:
    """Synchronous `cudaMemcpy` through the libcudart already mapped into this process."""

    def __init__(self, lib: Any) -> None:
        self._memcpy = lib.cudaMemcpy
        self._memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._memcpy.restype = ctypes.c_int
        self._sync = lib.cudaStreamSynchronize  # on the legacy stream (0), where cudaMemcpy runs
        self._sync.argtypes = [ctypes.c_void_p]
        self._sync.restype = ctypes.c_int

    @classmethod
    def loaded(cls, maps: Path = Path("/proc/self/maps")) -> CudaCopy | None:
        """The CUDA runtime onnxruntime loaded when `OMNIEDGE_CUDA_MEMCPY=1`; else None (also with no CUDA
        runtime in the process, or two, or not on Linux): onnxruntime's own calls then do the copies."""
        if os.environ.get(ENABLE_ENV, "0").strip() != "1":
            return None
        try:
            lines = maps.read_text().splitlines()
        except OSError:
            lines = []
        paths = sorted({ln.split()[-1] for ln in lines if "/libcudart.so" in ln})
        try:
            if len(paths) == 1:  # not none, nor two CUDA runtimes
                return cls(ctypes.CDLL(paths[0]))
        except (OSError, AttributeError):
            pass
        warnings.warn(
            f"{ENABLE_ENV}=1 but this process has no single CUDA runtime library to call ({len(paths)} "
            "mapped, one that opens is needed): onnxruntime's own calls do the copies",
            stacklevel=2,
        )
        return None

    def _run(self, dst: int, src: int, n: int, kind: int) -> None:
        err = self._memcpy(dst, src, n, kind)
        if err == 0 and kind == _TO_DEVICE:
            # from pageable memory cudaMemcpy may return before its DMA lands; onnxruntime reads on a stream
            # of its own that does not wait for the legacy one
            err = self._sync(None)
        if err != 0:
            raise OmniedgeError(
                f"cudaMemcpy failed with CUDA error {err}", "check the GPU (nvidia-smi) and restart"
            )

    def to_device(self, dst_ptr: int, host: np.ndarray) -> None:
        self._run(dst_ptr, host.ctypes.data, host.nbytes, _TO_DEVICE)

    def to_host(self, host: np.ndarray, src_ptr: int) -> None:
        self._run(host.ctypes.data, src_ptr, host.nbytes, _TO_HOST)


class DecodeInputs:
    """`inputs_embeds` [1, 1, hidden], `position_ids` [1, 1] int64 and `seqlens_k` [1] int32 in one buffer."""

    def __init__(
        self, ort: Any, device: str, hidden: int, dtype: Any, copier: CudaCopy | None = None
    ) -> None:
        dt = np.dtype(dtype)
        self.device, self.hidden, self._copier = device, hidden, copier
        self.pos_at = _aligned(hidden * dt.itemsize)
        self.seq_at = self.pos_at + _ALIGN
        self.host = np.zeros(self.seq_at + _ALIGN, np.uint8)
        self.embeds = self.host[: hidden * dt.itemsize].view(dt).reshape(1, 1, hidden)
        self.position = self.host[self.pos_at : self.pos_at + 8].view(np.int64).reshape(1, 1)
        self.seqlens = self.host[self.seq_at : self.seq_at + 4].view(np.int32)
        if device == "cpu":  # a CPU OrtValue made from an array is that array's memory
            self.bound = ort.OrtValue.ortvalue_from_numpy(self.host)
        else:
            self.bound = ort.OrtValue.ortvalue_from_shape_and_type([self.host.size], np.uint8, device, 0)
        self._ptr = int(self.bound.data_ptr())
        self.how = "shared memory" if device == "cpu" else ("cudaMemcpy" if copier else "update_inplace")

    def bind(self, io: Any) -> None:
        for name, dtype, shape, at in (
            ("inputs_embeds", self.embeds.dtype.type, [1, 1, self.hidden], 0),
            ("position_ids", np.int64, [1, 1], self.pos_at),
            ("seqlens_k", np.int32, [1], self.seq_at),
        ):
            io.bind_input(name, self.device, 0, dtype, shape, self._ptr + at)

    def write(self, embed_row: np.ndarray, position: int, seqlens: int) -> None:
        """Stage the step's inputs and copy them to the device in one call."""
        self.embeds[0, 0] = np.reshape(embed_row, -1)  # any [hidden]-sized row; cast to the graph's type here
        self.position[0, 0] = position
        self.seqlens[0] = seqlens
        if self.device == "cpu":
            return
        if self._copier is not None:
            self._copier.to_device(self._ptr, self.host)
        else:
            self.bound.update_inplace(self.host)


class TokenReader:
    """Reads the graph's `next_token` output ([1] int64) into a fixed host array."""

    def __init__(self, next_token: Any, device: str, copier: CudaCopy | None = None) -> None:
        self._next, self._host = next_token, np.zeros(1, np.int64)
        self._copier = copier if device != "cpu" else None
        self._ptr = int(next_token.data_ptr())
        self.how = "cudaMemcpy" if self._copier else "numpy"

    def read(self) -> int:
        if self._copier is None:  # on the CPU this is the bound buffer itself
            return int(self._next.numpy().reshape(-1)[0])
        self._copier.to_host(self._host, self._ptr)
        return int(self._host[0])
