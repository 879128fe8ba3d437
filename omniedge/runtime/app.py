"""`Omni`: the object robot and kiosk code holds. Load a bundle once, then ask with text, an image, audio.

    omni = Omni.load("out/tiny-bundle")
    print(omni.chat("What do you see?", image="cat.jpg").text)
    for piece in omni.stream("What did I say?", audio="question.wav"):
        print(piece, end="", flush=True)

One request runs at a time (a first-come-first-served queue, bounded by `max_queue`), so several threads
may share one `Omni`. `memory_budget` keeps every engine, the KV cache and the rest within one budget
(runtime/plan.py, runtime/scheduler.py): engines load on demand and the least recently used are evicted.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.prompts import ASR_PROMPT
from omniedge.runtime.admission import AdmissionQueue
from omniedge.runtime.backends import EngineBackend, OrtBackend
from omniedge.runtime.budget import MeasuredThinker
from omniedge.runtime.bundle_files import load_embed, load_tokenizer
from omniedge.runtime.generate import (
    GenerationResult,
    SamplingParams,
    ThinkerInputs,
    Timings,
    TokenEvent,
    embed_prompt,
    finish_reason,
    run_generation,
)
from omniedge.runtime.manifest import Manifest, load_manifest
from omniedge.runtime.media import AudioInput, ImageInput
from omniedge.runtime.mrope import rope_index
from omniedge.runtime.preprocess import AudioChunks, mel_filter_bank
from omniedge.runtime.request import Request, preprocess
from omniedge.runtime.thinker_ort import OrtThinker, make_thinker

Result = GenerationResult
# KV cache length when the caller names none: the cache is allocated whole at load (in place updates).
DEFAULT_CONTEXT = 4096


def _report(found: list[str], notes: list[str] | None) -> None:
    """Warnings go into the result (`chat`) or, where there is none (`stream`), to Python's warnings."""
    if notes is not None:
        notes.extend(found)
    else:
        for note in found:
            warnings.warn(note, stacklevel=4)


class Omni:
    """A loaded bundle: tokenizer, embedding table, and the vision / audio / thinker engines."""

    def __init__(
        self,
        manifest: Manifest,
        tokenizer: Any,
        embed_table: np.ndarray,
        engines: dict[str, EngineBackend],
        max_context: int | None = None,
        max_queue: int | None = None,
        prefill_chunk: int | None = None,
        prefill_buckets: tuple[int, ...] | None = None,
    ) -> None:
        self.manifest = manifest
        self.prefill_chunk = prefill_chunk
        self.prefill_buckets = prefill_buckets
        self.tokenizer = tokenizer
        self.embed_table = embed_table
        self.engines = engines
        t = manifest.text
        self.max_context = min(max_context or DEFAULT_CONTEXT, t.max_position_embeddings)
        self._thinker: Any = make_thinker(
            manifest, engines["thinker"], self.max_context, prefill_chunk, prefill_buckets=prefill_buckets
        )
        self._queue = AdmissionQueue(max_queue)
        self.scheduler: Any = None  # a runtime.scheduler.Scheduler when loaded with a memory budget
        a = manifest.audio
        self._mel_filters = (
            mel_filter_bank(a.n_mels, a.n_fft, a.sampling_rate, 0.0, a.sampling_rate / 2) if a else None
        )
        self.load_seconds: dict[str, float] = {}

    # ------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        providers: str | Sequence[str] | None = None,
        verify_checksums: bool = False,
        max_context: int | None = None,
        memory_budget: str | int | None = None,
        pin: Sequence[str] = ("thinker",),
        max_queue: int | None = None,
        cuda_graph: bool = True,
        prefill_chunk: int | None = None,
        prefill_buckets: tuple[int, ...] | None = None,
    ) -> Omni:
        """Read the manifest, tokenizer and embeddings, and load every engine (CPU unless `providers`).

        `max_context` sizes the thinker's KV cache (allocated once, default 4096 tokens, at most the model's
        limit); `cuda_graph` replays the decode step as a CUDA graph when the CUDA provider runs it;
        `prefill_chunk` feeds long prompts to the ORT thinker in pieces of that many tokens (CPU workspaces
        scale with the piece, not the prompt; on CUDA it raised GPU memory, measured; None: whole);
        `prefill_buckets` the lengths a prompt's pieces are padded to (None: the runtime's choice, fixed
        lengths on CUDA, whole prompts on the CPU; (): whole prompts; runtime/thinker_ort.py says why).
        With `memory_budget` ("6GB", "50%", bytes) only the pinned engines load now, the others on demand,
        and the context is what the budget leaves (or `max_context`, if it fits); BudgetError otherwise.
        """
        m = load_manifest(bundle_dir, verify_checksums=verify_checksums)
        tokenizer = load_tokenizer(m.tokenizer_file)
        embed = load_embed(m)
        engines: dict[str, EngineBackend] = {}
        for name, comp in m.components.items():
            if name not in ("thinker", "vision", "audio"):
                continue  # talker & co. are not runtime inputs yet
            if comp.onnx is None:
                raise OmniedgeError(
                    f"bundle component {name} has only a TensorRT engine; this runtime runs ONNX for now",
                    "keep the .onnx files in the bundle",
                )
            engines[name] = OrtBackend(
                name,
                comp.onnx,
                providers=providers,
                cuda_graph=cuda_graph and name == "thinker",
                cpu_arena=memory_budget is None,
                custom_ops=m.thinker.custom_ops if name == "thinker" else (),
            )
        if memory_budget is not None:
            from omniedge.runtime.budget import load_with_budget

            return load_with_budget(
                cls,
                m,
                tokenizer,
                embed,
                engines,
                memory_budget,
                pin,
                max_context,
                max_queue,
                prefill_chunk=prefill_chunk,
                prefill_buckets=prefill_buckets,
            )
        load_seconds: dict[str, float] = {}
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.load()
            load_seconds[name] = time.perf_counter() - t0
        omni = cls(
            m,
            tokenizer,
            embed,
            engines,
            max_context=max_context,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            prefill_buckets=prefill_buckets,
        )
        omni.load_seconds = load_seconds
        return omni

    @property
    def thinker(self) -> Any:
        """The thinker's runner (its KV cache allocated for `max_context`); made again after `close`."""
        if self._thinker is None:
            self._thinker = make_thinker(
                self.manifest,
                self.engines["thinker"],
                self.max_context,
                self.prefill_chunk,
                prefill_buckets=self.prefill_buckets,
            )
        return self._thinker

    def close(self) -> None:
        """Unload every engine and free the KV cache; a later request loads what it needs again."""
        if self.scheduler is not None:
            self.scheduler.close()  # also records the measured footprints
        self._thinker = None  # the ORT runner holds the thinker's session and KV cache
        for eng in self.engines.values():
            eng.unload()

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def footprint_bytes(self) -> int:
        """Engine memory plus the embedding table (mapped, so counted at its full size)."""
        return sum(e.footprint_bytes() for e in self.engines.values()) + int(self.embed_table.nbytes)

    # ------------------------------------------------------------ preprocessing

    def preprocess(
        self,
        prompt: str,
        image: ImageInput | None = None,
        audio: AudioInput | None = None,
        system: str | None = None,
    ) -> Request:
        """Decode media and build model inputs in numpy (no engine runs here)."""
        return preprocess(self.manifest, self.tokenizer, self._mel_filters, prompt, image, audio, system)

    # ------------------------------------------------------------ encoders

    def encode_image(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.engines["vision"].run({"pixel_values": pixel_values})
        return out["image_embeds"], out.get("deepstack_embeds")

    def encode_audio(self, chunks: AudioChunks) -> np.ndarray:
        out = self.engines["audio"].run(
            {
                "padded_features": chunks.padded_features,
                "valid_indices": chunks.valid_indices,
                "window_ids": chunks.window_ids,
            }
        )
        return out["audio_embeds"]

    def thinker_inputs(self, req: Request, timings: Timings | None = None) -> ThinkerInputs:
        """Run the encoders and assemble the prefill inputs: embeddings, M-RoPE positions, deepstack."""
        timings = timings if timings is not None else Timings()
        m = self.manifest
        img = ds = aud = None
        if req.pixel_values is not None:
            t0 = time.perf_counter()
            img, ds = self.encode_image(req.pixel_values)
            timings.image_encode_s = time.perf_counter() - t0
        if req.chunks is not None:
            t0 = time.perf_counter()
            aud = self.encode_audio(req.chunks)
            timings.audio_encode_s = time.perf_counter() - t0
        ids = req.prompt.ids
        embeds, deepstack = embed_prompt(
            self.embed_table,
            ids,
            image_pad=m.special_tokens.get("image_pad"),
            image_embeds=img,
            deepstack=ds,
            audio_pad=m.special_tokens.get("audio_pad"),
            audio_embeds=aud,
            num_deepstack=m.text.num_deepstack,
            dtype=m.thinker.input_dtype,
        )
        grids = [req.image_grid_thw] if req.image_grid_thw is not None else []
        merge = m.image.merge_size if m.image else 2
        pos, delta = rope_index(ids, m.special_tokens, grids, merge, m.position_id_per_seconds)
        return ThinkerInputs(ids, embeds, pos[:, None, :], deepstack, delta)

    # ------------------------------------------------------------ generation

    def _events(
        self,
        prompt: str,
        image: ImageInput | None,
        audio: AudioInput | None,
        params: SamplingParams,
        system: str | None,
        cancel: threading.Event | None,
        on_token: Callable[[TokenEvent], None] | None,
        timings: Timings,
        token_ids: list[int],
        notes: list[str] | None = None,
    ) -> Iterator[TokenEvent]:
        params.check()
        t_request = time.perf_counter()
        req = self.preprocess(prompt, image, audio, system)
        _report(req.warnings, notes)
        timings.preprocess_s = time.perf_counter() - t_request
        inputs = self.thinker_inputs(req, timings)
        measured = self.scheduler is not None and isinstance(self.thinker, OrtThinker)
        thinker = MeasuredThinker(self.thinker, self.scheduler) if measured else self.thinker
        for ev in run_generation(
            thinker,
            self.tokenizer,
            self.embed_table,
            inputs,
            self.manifest.eos_token_ids,
            params,
            self.max_context,
            timings,
            cancel,
            on_token,
            t_request,
        ):
            token_ids.append(ev.token_id)
            yield ev
        timings.total_s = time.perf_counter() - t_request

    def chat(
        self,
        prompt: str,
        image: ImageInput | None = None,
        audio: AudioInput | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        system: str | None = None,
        cancel: threading.Event | None = None,
        on_token: Callable[[TokenEvent], None] | None = None,
    ) -> Result:
        """Answer one request; `on_token` streams events as they come; `cancel.set()` stops early."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
        timings, ids, notes = Timings(), [], []
        with self._queue.turn():
            for _ in self._events(
                prompt, image, audio, params, system, cancel, on_token, timings, ids, notes
            ):
                pass
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cancelled = cancel is not None and cancel.is_set()
        return Result(text, ids, finish_reason(ids, self.manifest.eos_token_ids, cancelled), timings, notes)

    def stream(
        self,
        prompt: str,
        image: ImageInput | None = None,
        audio: AudioInput | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        system: str | None = None,
        cancel: threading.Event | None = None,
        timings: Timings | None = None,
    ) -> Iterator[str]:
        """Text pieces as they are generated. The lock is held until the iterator ends or is closed.

        Bad arguments fail here, at the call; media and prompt errors at the first `next()`.
        """
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
        params.check()
        return self._stream(
            prompt, image, audio, params, system, cancel, timings if timings is not None else Timings()
        )

    def _stream(
        self,
        prompt: str,
        image: ImageInput | None,
        audio: AudioInput | None,
        params: SamplingParams,
        system: str | None,
        cancel: threading.Event | None,
        timings: Timings,
    ) -> Iterator[str]:
        ids: list[int] = []
        with self._queue.turn():
            for ev in self._events(prompt, image, audio, params, system, cancel, None, timings, ids):
                if ev.text:
                    yield ev.text

    # ------------------------------------------------------------ conveniences

    def transcribe(self, audio: AudioInput, max_new_tokens: int = 128) -> str:
        """What was said in `audio` (greedy)."""
        return self.chat(ASR_PROMPT, audio=audio, max_new_tokens=max_new_tokens).text

    def describe(self, image: ImageInput, max_new_tokens: int = 128) -> str:
        """A description of `image` (greedy)."""
        return self.chat("Describe the image.", image=image, max_new_tokens=max_new_tokens).text
