"""The thinker of an ORT-flavour bundle, run with its KV cache and step buffers resident on the device.

The graph (export/thinker_ort.py) takes a KV buffer of `max_context` tokens per layer whose past and
present are the same tensor: the runtime binds one device buffer to both (ONNX Runtime IO binding), so
attention appends in place and nothing travels between steps but the new token's embedding row, its
position and the lengths (a few bytes). Decode binds the same buffers every step, so on CUDA the step is
captured once as a CUDA graph and replayed; prefill (any length) runs outside the captured graph. Greedy
decoding reads the graph's argmax; sampling copies the logits. The same code runs on the CPU.

Prompt shapes on CUDA: ONNX Runtime's CUDA kernels pay a one-time cost for every new prompt length (QMoE
profiles its grouped-GEMM tactics per power-of-two bucket, and each new shape costs ~0.4 s more): on the
H200 a request whose length had not been seen took 0.4-11 s to its first token where a repeat took 7-251 ms
(bench/results/2026-12-01-h200-prefill-shapes.md). So on CUDA the runtime feeds prompts in pieces of a few
fixed lengths (`prefill_buckets`): pieces of the largest, the last piece padded with zero embeddings up to
the smallest bucket that holds it (pads come after the prompt's last token, so causal attention keeps them
out of every real token; `logits_index` picks the last real token's logits; the decode steps overwrite
their cache rows). The warm-up at load runs each bucket once, then returns the arena's free memory to the
device before the decode step is captured: prefill workspaces are then those of the largest bucket, not of
the longest prompt.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.runtime.mrope import rope_rows
from omniedge.runtime.prefill_pieces import CUDA_PREFILL_BUCKETS, check_buckets, plan_pieces
from omniedge.runtime.step_buffers import DecodeInputs

_NP = {"float16": np.float16, "float32": np.float32}


def _any_bit_set(a: np.ndarray) -> bool:
    """Anything but +0.0 in `a`? Read as bytes: 0.3 ms where np.any took 2.2 (float16, 512 tokens' features)."""
    return bool(np.ascontiguousarray(a).reshape(-1).view(np.uint8).any())


@dataclass(frozen=True)
class RopeSpec:
    inv_freq: np.ndarray
    axis: np.ndarray
    scaling: float

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rope_rows(positions, self.inv_freq, self.axis, self.scaling)


class StepOutput:
    """What one graph run produced, left on the device until asked for."""

    def __init__(self, logits: Any, next_token: Any) -> None:
        self._logits, self._next = logits, next_token

    def greedy(self) -> int:
        return int(self._next.numpy().reshape(-1)[0])

    def logits(self) -> np.ndarray:
        # a copy: on the CPU the OrtValue's array is the bound buffer itself, which the next step overwrites
        return np.array(self._logits.numpy(), dtype=np.float32).reshape(-1)


class OrtThinker:
    """Prefill and decode through IO binding; one request at a time (the app holds a lock)."""

    def __init__(
        self,
        session: Any,
        device: str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        hidden: int,
        vocab: int,
        num_deepstack: int,
        dtype: str,
        rope: RopeSpec,
        max_context: int,
        cuda_graph: bool = False,
        warm_up: bool = True,
        prefill_chunk: int | None = None,
        graph_id: int = 1,
        prefill_buckets: tuple[int, ...] = (),
        has_logits_index: bool = True,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.device = device
        self.dtype = _NP[dtype]
        self.hidden, self.num_deepstack, self.rope = hidden, num_deepstack, rope
        self.max_context = int(max_context)
        self.cuda_graph = cuda_graph
        if prefill_chunk is not None and prefill_chunk < 1:
            raise OmniedgeError(
                f"prefill_chunk is {prefill_chunk}", "pass a positive number of tokens, or None"
            )
        self.prefill_chunk = prefill_chunk
        # only lengths that fit the cache: the warm-up runs each, and pieces use nothing else
        checked = check_buckets(prefill_buckets, prefill_chunk, has_logits_index)
        self.prefill_buckets = tuple(b for b in checked if b <= self.max_context)
        self.has_logits_index = has_logits_index
        self.graph_id = graph_id
        self.num_layers = num_layers
        kv_shape = [1, num_kv_heads, self.max_context, head_dim]
        # The KV cache: one buffer per layer and kind, past and present bound to it.
        self.kv = [self._alloc(kv_shape, self.dtype) for _ in range(2 * num_layers)]
        self.kv_bytes = 2 * num_layers * int(np.prod(kv_shape)) * np.dtype(self.dtype).itemsize
        self.logits_buf = self._alloc([1, vocab], np.float32)
        self.next_buf = self._alloc([1], np.int64)
        # decode-step inputs: one fixed buffer the CUDA graph replays on, one copy a step (step_buffers.py)
        self.step_in = DecodeInputs(ort, device, hidden, self.dtype)
        self.d_deepstack = (
            self._value(np.zeros((num_deepstack, 1, 1, hidden), self.dtype)) if num_deepstack else None
        )
        self._zero_deep: Any = None  # prefill's deepstack input when the prompt has no image (see below)
        self._zero_deep_width = 0
        self.d_total = ort.OrtValue.ortvalue_from_numpy(
            np.array(self.max_context, np.int32)
        )  # read on the host by attention; see decode
        self.d_logits_index = self._value(np.zeros(1, np.int64))  # decode: its one token
        cos, sin = rope.rows(np.broadcast_to(np.arange(self.max_context), (3, self.max_context)))
        self.d_cos, self.d_sin = self._value(cos.astype(self.dtype)), self._value(sin.astype(self.dtype))
        self._decode = self._bind_decode()
        self._decode_opts = ort.RunOptions()
        self._prefill_opts = ort.RunOptions()
        if cuda_graph:
            # one graph per runner: a second runner on the session binds other buffers (ids are session-wide)
            self._decode_opts.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._prefill_opts.add_run_config_entry("gpu_graph_id", "-1")
        self.cache_len = 0
        self.warm_up_at_load = warm_up
        if warm_up and self.device != "cpu":
            self.warm_up()

    # ------------------------------------------------------------ buffers

    def _alloc(self, shape: list[int], dtype: Any) -> Any:
        if self.device == "cpu":
            return self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)

    def _value(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def _bind_common(self, io: Any) -> None:
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                buf = self.kv[2 * i + j]
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        io.bind_ortvalue_output("logits", self.logits_buf)
        io.bind_ortvalue_output("next_token", self.next_buf)

    def _bind_decode(self) -> Any:
        io = self.session.io_binding()
        self._bind_common(io)
        self.step_in.bind(io)  # inputs_embeds, position_ids, seqlens_k
        if self.d_deepstack is not None:
            io.bind_ortvalue_input("deepstack_embeds", self.d_deepstack)
        io.bind_ortvalue_input("cos_cache", self.d_cos)
        io.bind_ortvalue_input("sin_cache", self.d_sin)
        io.bind_ortvalue_input("total_sequence_length", self.d_total)
        if self.has_logits_index:
            io.bind_ortvalue_input("logits_index", self.d_logits_index)
        return io

    def _run(self, io: Any, opts: Any) -> StepOutput:
        try:
            self.session.run_with_iobinding(io, opts)
            # a replayed CUDA graph returns before the device finishes: wait before anyone reads an output
            io.synchronize_outputs()
        except Exception as e:  # onnxruntime raises its own exception types
            raise OmniedgeError(
                f"the thinker graph failed: {str(e).splitlines()[0]}",
                "check that the bundle matches this onnxruntime (re-export it) and its execution provider",
            ) from e
        return StepOutput(self.logits_buf, self.next_buf)

    # ------------------------------------------------------------ steps

    def warm_up(self) -> None:
        """Each prompt shape this runner will run, once, then an empty cache: with `prefill_buckets`, one
        prefill per bucket, the last returning the device arena's free memory (before the decode step is
        captured, so the captured graph's buffers are allocated afterwards and never returned), then the
        largest once more; without, one prefill of `max_context` tokens.

        On CUDA, the first prompt of each new length makes ONNX Runtime pick GEMM tactics and grow its
        device arena. Done after the decode step is captured as a CUDA graph, a long prompt grew GPU
        memory from 12.2 to 17.9 GiB on the H200 (30B thinker, 4096-token context:
        bench/results/2026-12-01-h200-decode-xqa-warmup.md). Done first, at load, the arena is sized once
        and the first real request is not slowed by the tactic profiling. Without it, two of the first three
        omni-mini prompts there came back with NaN logits (with it: 32 of 32 requests equal transformers).
        It costs load time, paid again whenever the thinker is reloaded: 5.4 s for the fixed lengths on the
        H200 (one whole-context prefill of 4,168 tokens took 18 s; bench/results/2026-12-01-h200-prefill-shapes.md).
        """
        sizes = list(self.prefill_buckets) or [self.max_context]  # buckets: those that fit the cache
        if self.shrink_at_warm_up:
            # the last bucket's run returns the free memory (the kernels' tactic profiling left gigabytes);
            # the largest bucket once more then takes back what a prompt needs, so the first request does
            # not pay for device allocations
            sizes = [*sizes, sizes[-1]]
        # random embeddings, not zeros: the MoE kernels pick their tactics by timing these runs, and zeros
        # send every token to the same experts, a routing no real prompt has
        rng = np.random.default_rng(0)
        for i, n in enumerate(sizes):
            shrink = self.shrink_at_warm_up and i == len(sizes) - 2
            opts = self._shrink_opts() if shrink else None
            embeds = (rng.standard_normal((1, n, self.hidden)) * 0.02).astype(self.dtype)
            self.prefill(embeds, np.broadcast_to(np.arange(n), (3, n)), None, _opts=opts)
        self.cache_len = 0

    @property
    def shrink_at_warm_up(self) -> bool:
        # only the session's first runner: a later one's warm-up must not free a captured graph's buffers
        return bool(self.prefill_buckets) and self.device != "cpu" and self.graph_id == 1

    def _shrink_opts(self) -> Any:
        opts = self._ort.RunOptions()
        if self.cuda_graph:
            opts.add_run_config_entry("gpu_graph_id", "-1")
        opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
        return opts

    def prefill(
        self,
        inputs_embeds: np.ndarray,
        positions: np.ndarray,
        deepstack: np.ndarray | None,
        _opts: Any = None,
    ) -> StepOutput:
        """A new request: `inputs_embeds` [1, seq, H], M-RoPE `positions` [3, seq]; the cache starts empty.

        The prompt goes through in the pieces `pieces` gives (one piece unless `prefill_buckets` or
        `prefill_chunk` is set), each attending to the cache the earlier ones wrote (GroupQueryAttention's
        past + new tokens). The last piece's logits are the prompt's."""
        seq = int(inputs_embeds.shape[1])
        if seq < 1 or seq > self.max_context:
            raise OmniedgeError(
                f"the prompt is {seq} tokens; this thinker's context is {self.max_context}",
                "shorten the prompt or load with a larger max_context",
            )
        if deepstack is not None and not _any_bit_set(deepstack):
            deepstack = None  # no image: every piece binds the resident zeros (no conversion, no copy)
        pieces = self.pieces(seq)
        cos, sin = self.rope.rows(positions)
        pads = pieces[-1][0] + pieces[-1][2] - seq  # a padded last piece reads table rows past the prompt
        if pads:
            cos, sin = (np.pad(t, [(0, pads), (0, 0)]) for t in (cos, sin))
        out: StepOutput | None = None
        for start, end, width in pieces:
            rows = start + width  # table rows up to the piece's end
            out = self._prefill_piece(
                inputs_embeds[:, start:end],
                None if deepstack is None else deepstack[:, :, start:end],
                cos[:rows],
                sin[:rows],
                start,
                width,
                _opts,
            )
        self.cache_len = seq
        assert out is not None
        return out

    def pieces(self, seq: int) -> list[tuple[int, int, int]]:
        return plan_pieces(seq, self.prefill_buckets, self.prefill_chunk, self.max_context)

    def _prefill_piece(
        self,
        embeds: np.ndarray,
        deepstack: np.ndarray | None,
        cos: np.ndarray,
        sin: np.ndarray,
        past: int,
        width: int,
        opts: Any = None,
    ) -> StepOutput:
        """Tokens past..past+n-1 of a prompt, the first `past` already in the cache, run as `width` tokens
        (zero pads after the n real ones); `cos`/`sin` hold a row for each position up to past+width."""
        n = int(embeds.shape[1])
        if width > n:
            pad = [(0, 0)] * embeds.ndim
            pad[-2] = (0, width - n)
            embeds = np.pad(embeds, pad)
            if deepstack is not None:
                deepstack = np.pad(deepstack, [(0, 0), (0, 0), (0, width - n), (0, 0)])
        io = self.session.io_binding()
        self._bind_common(io)
        io.bind_ortvalue_input("inputs_embeds", self._value(np.asarray(embeds, dtype=self.dtype)))
        if self.num_deepstack and deepstack is None:
            self._bind_zero_deepstack(io, width)
        elif self.num_deepstack:
            io.bind_ortvalue_input("deepstack_embeds", self._value(np.asarray(deepstack, dtype=self.dtype)))
        rows = np.arange(past, past + width, dtype=np.int64)[None]
        io.bind_ortvalue_input("position_ids", self._value(rows))  # rows of the tables below
        io.bind_ortvalue_input("cos_cache", self._value(cos.astype(self.dtype)))
        io.bind_ortvalue_input("sin_cache", self._value(sin.astype(self.dtype)))
        io.bind_ortvalue_input("seqlens_k", self._value(np.array([past + width - 1], np.int32)))
        io.bind_ortvalue_input(
            "total_sequence_length", self._ort.OrtValue.ortvalue_from_numpy(np.array(past + width, np.int32))
        )
        if self.has_logits_index:
            io.bind_ortvalue_input("logits_index", self._value(np.array([n - 1], np.int64)))
        return self._run(io, opts or self._prefill_opts)

    def _bind_zero_deepstack(self, io: Any, width: int) -> None:
        """Deepstack features of a prompt without images are zeros: one resident buffer of them, grown to the
        widest piece so far and bound by address at any narrower width (converting and copying them took
        ~6 ms of a 512-token prefill's host time for the 30B thinker's shape)."""
        shape = [self.num_deepstack, 1, width, self.hidden]
        if self._zero_deep is None or self._zero_deep_width < width:
            self._zero_deep = self._value(np.zeros(shape, self.dtype))
            self._zero_deep_width = width
        ptr = int(self._zero_deep.data_ptr())
        io.bind_input("deepstack_embeds", self.device, 0, np.dtype(self.dtype).type, shape, ptr)

    def decode(self, embed_row: np.ndarray, position: int) -> StepOutput:
        """One token after the cached ones; `position` is its (plain) rotary position."""
        if self.cache_len >= self.max_context:
            raise OmniedgeError(f"the context of {self.max_context} tokens is full", "start a new request")
        if not 0 <= position < self.max_context:
            raise OmniedgeError(f"rotary position {position} is outside the table", "report this as a bug")
        self.step_in.write(embed_row, position, self.cache_len)  # seqlens_k: total length - 1
        # d_total holds the buffer length, not the tokens so far: host-side attention parameters derived from
        # it are then the same at every step, as a captured CUDA graph needs (seqlens_k carries the real length)
        out = self._run(self._decode, self._decode_opts)
        self.cache_len += 1
        return out


def make_thinker(
    manifest: Any,
    backend: Any,
    max_context: int,
    prefill_chunk: int | None = None,
    warm_up: bool | None = None,
    prefill_buckets: tuple[int, ...] | None = None,
) -> Any:
    """The runner for the bundle's thinker flavour: `OrtThinker` (device-resident cache) or the portable
    `NumpyCacheThinker`. Refuses a bundle whose graph needs an execution provider this session lacks.
    `warm_up`: None lets the backend decide (once per session and context on a GPU); False skips it (a
    probe that measures what each prompt adds). `prefill_buckets`: None is the runtime's choice
    (`CUDA_PREFILL_BUCKETS` on a GPU when the graph can read a padded prompt's logits and no
    `prefill_chunk` is asked for; whole prompts otherwise); () runs whole prompts."""
    from omniedge.runtime.generate import NumpyCacheThinker

    g, t = manifest.thinker, manifest.text
    if g.flavour == "portable":
        if prefill_chunk is not None:
            raise OmniedgeError(
                "prefill_chunk needs the ort thinker flavour (the portable graph takes a whole prompt)",
                "drop prefill_chunk, or export with --flavour ort",
            )
        return NumpyCacheThinker(backend, t.num_layers, t.num_kv_heads, t.head_dim, max_context)
    missing = [p for p in g.providers if p not in backend.providers]
    if missing:
        raise OmniedgeError(
            f"this bundle's thinker graph was built for {', '.join(missing)} (dtype {g.dtype}); this session "
            f"runs {', '.join(backend.providers)}",
            "run with --providers cuda on a GPU, or export a CPU bundle (omniedge export --device cpu)",
        )
    if g.dtype == "float16" and backend.device == "cpu":
        warnings.warn(
            "this bundle's thinker is float16 (exported for CUDA); ONNX Runtime runs it on the CPU, slowly: "
            "export a CPU bundle with `omniedge export --device cpu`",
            stacklevel=2,
        )
    rope = RopeSpec(np.asarray(g.inv_freq, np.float32), np.asarray(g.rope_axis, np.int64), g.rope_scaling)
    graph_id, warm = backend.next_thinker(max_context)
    if warm_up is not None:
        warm = warm and warm_up
    has_index = "logits_index" in backend.input_names()
    if prefill_buckets is None:
        gpu = backend.device != "cpu" and has_index and prefill_chunk is None
        prefill_buckets = CUDA_PREFILL_BUCKETS if gpu else ()
    return OrtThinker(
        backend.session,
        backend.device,
        t.num_layers,
        t.num_kv_heads,
        t.head_dim,
        t.hidden_size,
        t.vocab_size,
        t.num_deepstack,
        g.dtype,
        rope,
        max_context,
        cuda_graph=backend.cuda_graph,
        prefill_chunk=prefill_chunk,
        warm_up=warm,
        graph_id=graph_id,
        prefill_buckets=prefill_buckets,
        has_logits_index=has_index,
    )
