"""A decode step's inputs: one copy to the device.

A decode step needs three small inputs (the new token's embedding row, its rotary position, the cache length)
and gives back one token id. On CUDA every copy between host and device is a synchronous call that costs far
more than its bytes, and the GPU waits through each: on the H200 (30B thinker, 3.05 ms per step) three
`OrtValue.update_inplace` calls took 49 us and reading the token with `OrtValue.numpy()` 35 us per step
(bench/h200/step_probe.py; bench/results/2026-12-01-h200-decode-rounds.md). So the three inputs live in
one device buffer at fixed offsets, bound to the graph by address (the captured CUDA graph replays on those
addresses) and written from one host staging buffer by one `update_inplace` (the token is read with
`numpy()` by thinker_ort.StepOutput). On the CPU the staging buffer is the bound buffer itself: nothing is copied. Measured after the
change, same machine kind: the host adds 36 us to a step instead of 43-48
(bench/results/2026-12-01-h200-decode-host-share.md).

Both copies as plain `cudaMemcpy` calls through the CUDA runtime, instead of onnxruntime's, were tried and are
not kept: decode at 512 tokens 0.989 and 1.006 of the runtime's default (medians of two interleaved round
sweeps, each within the rounds' spread; same file).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_ALIGN = 256  # each input starts on its own 256-byte boundary, as device allocations do


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class DecodeInputs:
    """`inputs_embeds` [1, 1, hidden], `position_ids` [1, 1] int64 and `seqlens_k` [1] int32 in one buffer."""

    def __init__(self, ort: Any, device: str, hidden: int, dtype: Any) -> None:
        dt = np.dtype(dtype)
        self.device, self.hidden = device, hidden
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
        self.how = "shared memory" if device == "cpu" else "update_inplace"

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
        if self.device != "cpu":
            self.bound.update_inplace(self.host)
