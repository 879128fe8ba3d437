"""Prefill, then decode token by token with the KV cache, through the thinker graph.

The thinker graph (docs/artifacts.md §2) takes embeddings, not ids: the runtime looks ids up in
embed_tokens.npy (memory-mapped) and writes the encoders' outputs over the media pad positions. A thinker
runner owns its KV cache: on the device and updated in place for the ORT flavour (runtime/thinker_ort.py),
as arrays through every step for the portable flavour (`NumpyCacheThinker`). Streaming is an iterator of
tokens; a threading.Event cancels between steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.runtime.backends import EngineBackend


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise OmniedgeError(
                f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "ask for 1 or more"
            )
        if self.temperature < 0:
            raise OmniedgeError(f"temperature must be >= 0, got {self.temperature}", "0 means greedy")
        if self.top_k < 0:
            raise OmniedgeError(f"top_k must be >= 0, got {self.top_k}", "0 disables top-k")
        if not 0.0 < self.top_p <= 1.0:
            raise OmniedgeError(f"top_p must be in (0, 1], got {self.top_p}", "1.0 disables nucleus sampling")


@dataclass
class Timings:
    """Seconds. TTFT counts from the request (media decode and encoders included) to the first token."""

    preprocess_s: float = 0.0
    image_encode_s: float = 0.0
    audio_encode_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)  # decode steps, first token excluded
    total_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0

    def decode_tokens_per_s(self) -> float:
        lat = self.token_latencies_s
        return len(lat) / sum(lat) if lat and sum(lat) > 0 else 0.0


@dataclass
class ThinkerInputs:
    """Everything the prefill needs, built from the prompt ids and the encoders' outputs."""

    ids: np.ndarray  # int64 [seq]
    inputs_embeds: np.ndarray  # [1, seq, hidden], the thinker's input type (float16 or float32)
    position_ids: np.ndarray  # int64 [3, 1, seq]
    deepstack_embeds: np.ndarray  # [num_deepstack, 1, seq, hidden], the same type
    rope_delta: int


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos), "length" (max_new_tokens or context), "cancelled"
    timings: Timings
    warnings: list[str] = field(default_factory=list)  # e.g. a truncated WAV that was used as it is


def embed_prompt(
    embed_table: np.ndarray,
    ids: np.ndarray,
    image_pad: int | None = None,
    image_embeds: np.ndarray | None = None,
    deepstack: np.ndarray | None = None,
    audio_pad: int | None = None,
    audio_embeds: np.ndarray | None = None,
    num_deepstack: int = 0,
    dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_embeds [1, seq, H], deepstack_embeds [D, 1, seq, H]): token rows, media rows written over
    their pads in order (masked_scatter), deepstack features at image positions and zero elsewhere; in `dtype`,
    the thinker graph's input type (a float16 graph's rows are then gathered without a float32 round trip)."""
    ids = np.asarray(ids, dtype=np.int64)
    vocab, hidden = embed_table.shape
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise OmniedgeError(
            f"token id {int(ids.max())} is outside the vocabulary ({vocab})", "re-export the bundle"
        )
    x = np.array(embed_table[ids], dtype=dtype)  # a copy: media rows are written into it
    ds = np.zeros((num_deepstack, ids.size, hidden), dtype=dtype)
    for pad, emb, name in ((image_pad, image_embeds, "image"), (audio_pad, audio_embeds, "audio")):
        if emb is None:
            continue
        where = np.flatnonzero(ids == pad)
        if where.size != emb.shape[0]:
            raise OmniedgeError(
                f"the prompt has {where.size} {name} pad tokens but the encoder made {emb.shape[0]} embeddings",
                "build the prompt with the encoder's token count",
            )
        x[where] = emb
        if name == "image" and deepstack is not None and num_deepstack:
            ds[:, where] = deepstack[:num_deepstack]
    return x[None], ds[:, None]


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0, else softmax(logits / T) cut to top-k and top-p, drawn with `rng`."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of strictly more likely tokens
        cut = order[before >= params.top_p]
        p[cut] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


class TextStream:
    """Turns a growing list of ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._emit(text)

    def flush(self) -> str:
        """Whatever was held back, now that no more tokens come."""
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> str:
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text delta this token completed (may be "" mid-character or for special tokens)
    index: int  # 0 for the first new token


class StepOutput(Protocol):
    """One graph run's result: the greedy next token, or the last position's logits [vocab] float32."""

    def greedy(self) -> int: ...

    def logits(self) -> np.ndarray: ...


class ThinkerRunner(Protocol):
    """A thinker with its own KV cache: `prefill` starts a request, `decode` adds one token."""

    max_context: int

    def prefill(
        self, inputs_embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None
    ) -> StepOutput: ...

    def decode(self, embed_row: np.ndarray, position: int) -> StepOutput: ...


class _HostLogits:
    def __init__(self, logits: np.ndarray) -> None:
        self._l = np.asarray(logits, dtype=np.float32).reshape(-1)

    def greedy(self) -> int:
        return int(np.argmax(self._l))

    def logits(self) -> np.ndarray:
        return self._l


class NumpyCacheThinker:
    """The portable-flavour thinker graph (standard ONNX ops, for TensorRT): the KV cache goes in and out of
    every step as arrays, concatenated by the graph. Runs anywhere; the ORT flavour (runtime/thinker_ort.py)
    is the fast path."""

    def __init__(
        self, backend: EngineBackend, num_layers: int, num_kv_heads: int, head_dim: int, max_context: int
    ) -> None:
        self.backend = backend
        self.num_layers = num_layers
        self.kv_shape = (1, num_kv_heads, 0, head_dim)
        self.max_context = int(max_context)
        self.cache: list[np.ndarray] = []
        self.num_deepstack = 0

    def _run(self, embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray) -> _HostLogits:
        feeds: dict[str, np.ndarray] = {
            "inputs_embeds": embeds,
            "position_ids": positions,
            "deepstack_embeds": deepstack,
        }
        for i in range(self.num_layers):
            feeds[f"past_key_values.{i}.key"] = self.cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = self.cache[2 * i + 1]
        out = self.backend.run(feeds)
        self.cache = [out[f"present.{i}.{kv}"] for i in range(self.num_layers) for kv in ("key", "value")]
        return _HostLogits(out["logits"][0, -1])

    def prefill(
        self, inputs_embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None
    ) -> StepOutput:
        self.cache = [np.zeros(self.kv_shape, np.float32) for _ in range(2 * self.num_layers)]
        seq = int(inputs_embeds.shape[1])
        assert deepstack is not None
        self.num_deepstack = int(deepstack.shape[0])
        return self._run(inputs_embeds, np.asarray(positions, np.int64).reshape(3, 1, seq), deepstack)

    def decode(self, embed_row: np.ndarray, position: int) -> StepOutput:
        hidden = int(np.asarray(embed_row).size)
        emb = np.asarray(embed_row, dtype=np.float32).reshape(1, 1, hidden)
        pos = np.full((3, 1, 1), position, dtype=np.int64)
        return self._run(emb, pos, np.zeros((self.num_deepstack, 1, 1, hidden), np.float32))


def next_token(out: StepOutput, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy reads the graph's argmax; sampling draws from the logits."""
    return out.greedy() if params.temperature <= 0 else sample_token(out.logits(), params, rng)


def generate_steps(
    thinker: ThinkerRunner,
    embed_table: np.ndarray,
    inputs: ThinkerInputs,
    eos_token_ids: tuple[int, ...] | list[int],
    params: SamplingParams,
    max_context: int,
    timings: Timings,
    cancel: threading.Event | None = None,
    t_request: float | None = None,
) -> Iterator[tuple[int, bool]]:
    """Yield (new token id, whether it is the last); stops on eos (yielded), max_new_tokens, the context
    end, or `cancel` (checked between tokens, so the token before it is not flagged last).

    Fills `timings` as it goes, so a consumer that stops early still has the numbers so far.
    """
    params.check()
    seq = int(inputs.ids.size)
    if seq >= max_context:
        raise OmniedgeError(
            f"the prompt is {seq} tokens; this bundle's context is {max_context}",
            "shorten the text, or pass less audio (about 13 tokens per second)",
        )
    if cancel is not None and cancel.is_set():
        return
    rng = np.random.default_rng(params.seed)
    t0 = time.perf_counter()
    t_request = t0 if t_request is None else t_request
    timings.prompt_tokens = seq
    out = thinker.prefill(inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds)
    tok = next_token(out, params, rng)
    now = time.perf_counter()
    timings.prefill_s = now - t0
    timings.ttft_s = now - t_request
    eos = set(int(e) for e in eos_token_ids)
    n = 0
    while True:
        n += 1
        timings.new_tokens = n
        cache_len = seq + n - 1  # tokens whose keys are cached
        last = tok in eos or n >= params.max_new_tokens or cache_len + 1 > max_context
        yield tok, last
        if last or (cancel is not None and cancel.is_set()):
            return
        t = time.perf_counter()
        out = thinker.decode(embed_table[tok], cache_len + inputs.rope_delta)
        tok = next_token(out, params, rng)
        timings.token_latencies_s.append(time.perf_counter() - t)


def generate_tokens(
    thinker: ThinkerRunner,
    embed_table: np.ndarray,
    inputs: ThinkerInputs,
    eos_token_ids: tuple[int, ...] | list[int],
    params: SamplingParams,
    max_context: int,
    timings: Timings,
    cancel: threading.Event | None = None,
    t_request: float | None = None,
) -> Iterator[int]:
    """New token ids only (see generate_steps)."""
    for tok, _ in generate_steps(
        thinker, embed_table, inputs, eos_token_ids, params, max_context, timings, cancel, t_request
    ):
        yield tok


def finish_reason(token_ids: list[int], eos_token_ids: tuple[int, ...], cancelled: bool) -> str:
    if token_ids and token_ids[-1] in set(eos_token_ids):
        return "stop"
    return "cancelled" if cancelled else "length"


def run_generation(
    thinker: ThinkerRunner,
    tokenizer: Any,
    embed_table: np.ndarray,
    inputs: ThinkerInputs,
    eos_token_ids: tuple[int, ...],
    params: SamplingParams,
    max_context: int,
    timings: Timings,
    cancel: threading.Event | None = None,
    on_token: Callable[[TokenEvent], None] | None = None,
    t_request: float | None = None,
) -> Iterator[TokenEvent]:
    """Token events with their text deltas; `on_token` (if given) sees each event too."""
    stream = TextStream(tokenizer)
    steps = generate_steps(
        thinker, embed_table, inputs, eos_token_ids, params, max_context, timings, cancel, t_request
    )
    for i, (tok, last) in enumerate(steps):
        text = stream.push(tok)
        if last:
            text += stream.flush()  # an unfinished character at the very end is still shown
        ev = TokenEvent(tok, text, i)
        if on_token is not None:
            on_token(ev)
        yield ev
