"""Loading an `Omni` under a memory budget: plan, measure what was never measured, plan again, start.

The first start on a machine measures every engine at the largest run the plan assumes and at a short
one: the thinker with a prompt of the whole context and one of 32 tokens, the vision encoder with one
image, the audio encoder with the longest audio the runtime takes (30 s) and half a second, under the
budget's live checks, and records the numbers in BUNDLE/memory.json. Later starts plan from those numbers
at once, and measure again only when the context they plan for is longer than any prompt measured (a
run's cost is not extrapolated past what was measured).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from omniedge.runtime.backends import EngineBackend
from omniedge.runtime.footprints import EngineCost, FootprintStore
from omniedge.runtime.manifest import Manifest
from omniedge.runtime.memory import (
    MemoryMeter,
    default_meter,
    free_bytes,
    parse_budget,
    release_freed_memory,
    tune_malloc_for_serving,
)
from omniedge.runtime.plan import DEFAULT_HEADROOM, THINKER_FLOOR, Plan, plan_memory
from omniedge.runtime.scheduler import Scheduler

if TYPE_CHECKING:
    from omniedge.runtime.app import Omni

_PROBE_WORD = "the "  # one token a repetition in the usual BPE vocabularies, so a prompt hits a length
_PROBE_SLACK = 16  # tokens a probe prompt may fall short of its length (a word of several tokens)


def _weight_bytes(m: Manifest, name: str) -> int:
    c = m.components[name]
    return c.weight_bytes or (c.onnx.stat().st_size if c.onnx is not None and c.onnx.is_file() else 0)


def _providers(backends: Mapping[str, EngineBackend]) -> list[str]:
    first = next(iter(backends.values()), None)
    return list(getattr(first, "providers", None) or ["CPUExecutionProvider"])


def runs_keep_memory(providers: Sequence[str]) -> bool:
    """Whether engine runs keep what they grew: yes with a GPU provider (its device arena does not shrink);
    on the CPU alone no, since `Omni.load` turns ONNX Runtime's CPU arena off under a budget."""
    return any(p != "CPUExecutionProvider" for p in providers)


def plan_for(
    m: Manifest,
    budget: str | int,
    engines: Sequence[str],
    providers: Sequence[str],
    meter: MemoryMeter,
    base_bytes: int,
    pins: Sequence[str] = ("thinker",),
    max_context: int | None = None,
    headroom: int = DEFAULT_HEADROOM,
) -> tuple[Plan, FootprintStore]:
    """The plan from recorded measurements (weight file sizes for engines never measured here)."""
    store = FootprintStore(m.root, tuple(providers), meter.kind)
    recorded = store.read()
    costs = {n: recorded.get(n) or EngineCost.from_weights(_weight_bytes(m, n)) for n in engines}
    budget_bytes = parse_budget(budget, free_bytes(), in_use=meter.current())
    arenas = runs_keep_memory(providers)
    plan = plan_memory(m, budget_bytes, base_bytes, costs, pins, max_context, headroom, meter.kind, arenas)
    return plan, store


def _prompt_of(omni: Omni, tokens: int) -> str:
    """A text prompt whose request is `tokens` tokens long, or the nearest below (at least the template)."""
    count = lambda k: len(omni.preprocess(_PROBE_WORD * k).prompt.ids)  # noqa: E731
    lo, hi = 0, tokens
    while lo < hi:  # the most words whose prompt stays within `tokens` (count grows with the words)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= tokens else (lo, mid - 1)
    return _PROBE_WORD * lo


def probe_sizes(short_below: float, largest: float) -> list[float]:
    """The sizes a probe runs, in its order: the largest twice, first right after the load (as a request
    after a load gets it: a first run sets up buffers) and again (the peak of the same run varies from one
    run to the next); they set the rate. Then a short run (half the size below which runs are short),
    for the fixed costs that a short run's size does not cover."""
    return [largest, largest, *([short_below / 2] if short_below / 2 < largest else [])]


def _probe(omni: Omni) -> None:
    """Run every engine at the sizes `probe_sizes` gives (see the module docstring)."""
    m = omni.manifest
    for tokens in probe_sizes(THINKER_FLOOR, omni.max_context - 1):
        omni.chat(_prompt_of(omni, int(tokens)), max_new_tokens=2)  # a prefill, then one decode step
    if m.image is not None:
        h, w = m.image.size
        y, x = np.mgrid[0 : 2 * h, 0 : 2 * w]
        image = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
        pixels = omni.preprocess("", image=image).pixel_values
        assert pixels is not None
        for _ in range(2):  # every image has the one size the graph was built for
            omni.encode_image(pixels)
    if m.audio is not None:
        a = m.audio
        chunk_s = 2 * a.n_window * a.hop_length / a.sampling_rate  # 1 s: shorter audio is short
        for seconds in probe_sizes(chunk_s, a.max_seconds):
            t = np.arange(int(seconds * a.sampling_rate)) / a.sampling_rate
            wav = (0.2 * np.sin(2 * np.pi * (120 + 40 * np.sin(t)) * t)).astype(np.float32)
            chunks = omni.preprocess("", audio=(wav, a.sampling_rate)).chunks
            assert chunks is not None
            omni.encode_audio(chunks)


def _needs_probe(plan: Plan) -> bool:
    """Some engine never measured, or the plan reaches past the longest run measured."""
    longest = {e: plan.largest_run(e, plan.max_context - 1) for e in plan.costs}
    longest["thinker"] -= _PROBE_SLACK
    return any(not c.measured or c.largest_run < longest[e] for e, c in plan.costs.items())


def load_with_budget(
    cls: type[Omni],
    m: Manifest,
    tokenizer: object,
    embed: np.ndarray,
    backends: Mapping[str, EngineBackend],
    budget: str | int,
    pins: Sequence[str] = ("thinker",),
    max_context: int | None = None,
    max_queue: int | None = None,
    headroom: int = DEFAULT_HEADROOM,
    meter: MemoryMeter | None = None,
    prefill_chunk: int | None = None,
    prefill_buckets: tuple[int, ...] | None = None,
) -> Omni:
    """An Omni whose engines run through a Scheduler; BudgetError at once when the budget cannot work."""
    providers = _providers(backends)
    meter = meter or default_meter(providers)
    # Large blocks mapped on their own, so what a run frees goes back at once and a run's peak does not
    # depend on how fragmented the heap is (`omniedge serve` has done this already, before its threads).
    tune_malloc_for_serving()
    release_freed_memory()  # what the process really holds, not what malloc kept of earlier work
    base = meter.current() + int(embed.nbytes)  # the embedding table is mapped: count it whole
    plan, store = plan_for(m, budget, list(backends), providers, meter, base, pins, max_context, headroom)
    scheduler = Scheduler(backends, plan, meter, store)
    if _needs_probe(plan):
        probe = cls(
            m,
            tokenizer,
            embed,
            scheduler.engines,
            max_context=plan.max_context,
            prefill_chunk=prefill_chunk,
            prefill_buckets=prefill_buckets,
        )
        probe.scheduler = scheduler  # its runs (the thinker's prefill too) go through the scheduler
        _probe(probe)
        del probe
        scheduler.save()
        for name in plan.on_demand:  # start as planned: only the pinned engines resident
            scheduler.unload(name)
    scheduler.start()
    # Plan again from what was just measured (pinned engines loaded): this may shorten the context or refuse.
    scheduler.plan = plan_memory(
        m, plan.budget, base, scheduler.costs, pins, max_context, headroom, meter.kind, plan.arenas
    )
    omni = cls(
        m,
        tokenizer,
        embed,
        scheduler.engines,
        max_context=scheduler.plan.max_context,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        prefill_buckets=prefill_buckets,
    )
    omni.scheduler = scheduler
    return omni


class MeasuredThinker:
    """Under a memory budget the ORT runner's steps (IO binding, not backend.run) go through the scheduler,
    which makes room and measures each one, as it does for every other engine run. A prefill is sized by
    its prompt tokens and measured on a trimmed heap; a decode step is one token and not trimmed (a trim
    costs more than a step on omni-mini): its check and measurement take 0.06 ms on this project's CPU
    (bench/results/2026-12-01-memory-return-cpu-omni-mini.md)."""

    def __init__(self, thinker: Any, scheduler: Any) -> None:
        self._thinker, self._scheduler = thinker, scheduler
        self.max_context = thinker.max_context

    def prefill(self, inputs_embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None) -> Any:
        with self._scheduler.running("thinker", float(inputs_embeds.shape[1])):
            return self._thinker.prefill(inputs_embeds, positions, deepstack)

    def decode(self, embed_row: np.ndarray, position: int) -> Any:
        with self._scheduler.running("thinker", 1.0, trim=False):
            return self._thinker.decode(embed_row, position)
