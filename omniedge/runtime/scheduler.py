"""One memory budget for every engine, kept live: least-recently-used eviction of unpinned engines where
the plan's arithmetic says they do not all fit, a check of the real memory before every load and run
that never lets it pass the budget, and measurement of what each load and run costs (recorded for the
next plan, plan.py).

Two checks before each load and run, evicting until both hold:
- the plan's arithmetic (`Plan.engines_bytes`, the sum `need()` is made of): the engines left loaded,
  with this one loaded and its run's expected growth, fit in what the budget leaves to engines. This
  decides residency, the same way for the same request every time, whatever the heap holds.
- the meter: memory in use now plus the growth this load and run are expected to add stays a reserve
  below the budget. This is what refuses a request (BudgetError) when nothing is left to evict.

Measurements are made on a heap just handed back to the system (malloc_trim): ONNX Runtime's CPU arena
is off under a budget, so an engine's temporaries come from malloc, and a run that reuses what an
earlier one freed would otherwise look smaller than it is. Decode steps skip the trim (it costs about
as much as a step on a small model): the prefill before them hands its memory back after it ends, so
the first step of every request is measured on a clean heap.

The scheduler talks to engines only through the EngineBackend protocol (load, unload, footprint_bytes,
run) and wraps each in a `ScheduledEngine` that the app uses in its place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniedge.runtime.backends import EngineBackend
from omniedge.runtime.footprints import FootprintStore
from omniedge.runtime.memory import MemoryMeter, mib, release_freed_memory
from omniedge.runtime.plan import BudgetError, Plan

__all__ = ["BudgetError", "ScheduledEngine", "Scheduler", "run_size"]


def run_size(name: str, inputs: Mapping[str, np.ndarray]) -> float:
    """The unit a run's memory grows with (plan.run_units): tokens through the thinker (the new ones and
    the cached ones it is given), image patches through the vision encoder, audio tokens out of the audio
    encoder; input bytes for any other graph."""
    if name == "thinker" and "inputs_embeds" in inputs:
        past = inputs.get("past_key_values.0.key")
        return float(inputs["inputs_embeds"].shape[1] + (past.shape[2] if past is not None else 0))
    if name == "vision" and "pixel_values" in inputs:
        return float(inputs["pixel_values"].shape[0])
    if name == "audio" and "valid_indices" in inputs:
        return float(inputs["valid_indices"].shape[0])
    return float(sum(np.asarray(a).nbytes for a in inputs.values()))


@dataclass
class SchedulerStats:
    loads: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    runs: Counter[str] = field(default_factory=Counter)
    over_budget: int = 0  # runs or loads whose measured peak passed the budget (should stay 0)


class Scheduler:
    """Keeps engines within one budget: the plan's arithmetic and a live check before each load and run,
    LRU eviction, pins."""

    def __init__(
        self,
        backends: Mapping[str, EngineBackend],
        plan: Plan,
        meter: MemoryMeter,
        store: FootprintStore | None = None,
    ) -> None:
        self.backends = dict(backends)
        self.plan = plan
        self.meter = meter
        self.store = store
        self.costs = plan.costs
        self.stats = SchedulerStats()
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self.engines = {name: ScheduledEngine(self, name) for name in self.backends}

    @property
    def budget(self) -> int:
        return self.plan.budget

    def start(self) -> None:
        """Load the pinned engines now; the others wait for a request that needs them."""
        for name in self.plan.pinned:
            self.load(name)

    def close(self) -> None:
        with self._lock:
            self.save()
            for name in list(self._lru):
                self._unload(name, evicted=False)

    def save(self) -> bool:
        return self.store.write(self.costs) if self.store is not None else False

    def set_budget(self, budget: int) -> None:
        """Change the budget while serving (another model starts beside this one, or stops): evicts what no
        longer fits; BudgetError if the context this Omni was built with cannot fit the new budget."""
        with self._lock:
            ctx = self.plan.max_context
            if self.plan.need(ctx) > budget:
                raise BudgetError(
                    f"memory budget {mib(budget)} is below the {mib(self.plan.need(ctx))} needed for the "
                    f"context of {ctx} tokens this model was loaded with",
                    "load it again with the new budget (the context shrinks to fit)",
                )
            self.plan = dataclasses.replace(self.plan, budget=budget)
            self._make_room(None, 0.0)

    def resident(self) -> list[str]:
        return [n for n, b in self.backends.items() if b.loaded]

    # ------------------------------------------------------------ room, load, unload

    def _limit(self) -> int:
        """What the meter may read, with a load's or run's expected growth added. The plan keeps `headroom`
        above the base for memory that is not an engine's (it grows as requests come); a quarter of it stays
        free at every check for what other threads (request bodies arriving) allocate while an engine runs."""
        return self.plan.budget - self.plan.headroom_bytes // 4

    def _growth(self, name: str, size: float) -> int:
        """What loading `name` (if it is not loaded) and running `size` units of it is expected to add."""
        plan, cost = self.plan, self.costs[name]
        run = plan.run_bytes(name, size)
        if self.backends[name].loaded:
            return run
        return max(cost.load_peak_bytes, plan.resident_bytes(name, plan.max_context) + run)

    def _make_room(self, name: str | None, size: float) -> None:
        """Evict least recently used, unpinned engines (never `name`) until the plan's arithmetic holds for
        `name` running `size` units beside the engines left, and the memory in use plus that run's expected
        growth is within the limit; BudgetError when only the meter still says no and nothing is left."""
        plan = self.plan
        trimmed = False
        while True:
            loaded = [n for n in self._lru if n != name]
            if name is None:
                planned = sum(plan.resident_bytes(n, plan.max_context) for n in loaded)
            else:
                loading = not self.backends[name].loaded
                planned = plan.engines_bytes(loaded, name, size, plan.max_context, loading)
            victims = [n for n in self._lru if n != name and n not in plan.pinned]
            if planned > plan.engine_room() and victims:
                self._unload(victims[0], evicted=True)
                continue
            # The plan fits (or nothing is left to evict: the live check alone decides).
            need = self._growth(name, size) if name is not None else 0
            if self.meter.current() + need <= self._limit():
                return
            if not trimmed:  # malloc may still hold memory earlier requests freed: cheaper than evicting
                release_freed_memory()
                trimmed = True
                continue
            if not victims:
                now, kept_free = self.meter.current(), mib(plan.headroom_bytes // 4)
                what = f"{name} needs {mib(need)} more memory; " if name is not None else ""
                raise BudgetError(
                    f"{what}{mib(now)} is in use and the budget is {mib(plan.budget)} ({kept_free} of it "
                    "kept free), with nothing left to evict",
                    "raise --memory-budget, pin fewer engines, or send a shorter request",
                )
            self._unload(victims[0], evicted=True)

    def _unload(self, name: str, evicted: bool) -> None:
        self.backends[name].unload()
        self._lru.pop(name, None)
        release_freed_memory()
        if evicted:
            self.stats.evictions[name] += 1

    def load(self, name: str) -> None:
        with self._lock:
            backend = self.backends[name]
            if backend.loaded:
                self._lru[name] = None
                self._lru.move_to_end(name)
                return
            self._make_room(name, 0.0)
            release_freed_memory()  # measure the load on a clean heap
            before = self.meter.current()
            self.meter.reset_peak()
            backend.load()
            peak = self.meter.peak()
            after = self.meter.current()
            self._check(peak)
            self.costs[name].observe_load(max(backend.footprint_bytes(), after - before), peak - before)
            self.stats.loads[name] += 1
            self._lru[name] = None

    def unload(self, name: str) -> None:
        with self._lock:
            if self.backends[name].loaded:
                self._unload(name, evicted=False)

    def _check(self, peak: int) -> None:
        if peak > self.plan.budget:
            self.stats.over_budget += 1

    # ------------------------------------------------------------ runs

    @contextlib.contextmanager
    def running(self, name: str, size: float, trim: bool = True) -> Iterator[EngineBackend]:
        """Make room for a run of `size` units of `name`, load it, and measure the run's peak.

        `trim`: hand freed memory back to the system before the run (so its growth is measured whole)
        and after it (so what it used is gone, and what it left is measured). Decode steps pass False.
        """
        with self._lock:
            backend = self.backends[name]
            self._make_room(name, size)
            self.load(name)
            self._lru.move_to_end(name)
            if trim:
                release_freed_memory()
            before = self.meter.current()
            self.meter.reset_peak()
            try:
                yield backend
            finally:
                peak = self.meter.peak()
                self._check(peak)
                retained = None
                if trim:
                    release_freed_memory()
                    retained = max(0, self.meter.current() - before)
                short_below = self.plan.short_below.get(name, 0.0)
                rate_from = self.plan.rate_from(name)
                self.costs[name].observe_run(size, max(0, peak - before), retained, short_below, rate_from)
                self.stats.runs[name] += 1

    def run(self, name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        embeds = inputs.get("inputs_embeds")
        decode_step = name == "thinker" and embeds is not None and embeds.shape[1] == 1  # portable runner
        with self.running(name, run_size(name, inputs), trim=not decode_step) as backend:
            return backend.run(inputs)

    def snapshot(self) -> dict[str, Any]:
        """Numbers for /health and /metrics."""
        return {
            "meter": self.meter.kind,
            "budget_bytes": self.plan.budget,
            "current_bytes": self.meter.current(),
            "peak_bytes": self.meter.lifetime_peak(),
            "over_budget": self.stats.over_budget,
            "resident": self.resident(),
            "loads": dict(self.stats.loads),
            "evictions": dict(self.stats.evictions),
            "footprints": {n: c.load_bytes for n, c in self.costs.items()},
            "plan": self.plan.as_dict(),
        }


class ScheduledEngine:
    """An EngineBackend whose every run goes through the scheduler; what the app holds in its engines."""

    def __init__(self, scheduler: Scheduler, name: str) -> None:
        self._scheduler = scheduler
        self._backend = scheduler.backends[name]
        self.name = name

    @property
    def loaded(self) -> bool:
        return self._backend.loaded

    def load(self) -> None:
        self._scheduler.load(self.name)

    def unload(self) -> None:
        self._scheduler.unload(self.name)

    def footprint_bytes(self) -> int:
        return self._backend.footprint_bytes()

    def input_names(self) -> list[str]:
        self.load()
        return self._backend.input_names()

    def output_names(self) -> list[str]:
        self.load()
        return self._backend.output_names()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._scheduler.run(self.name, inputs)

    def __getattr__(self, attr: str) -> Any:
        """Anything else a backend offers (a session, IO binding): loaded first, then the backend's own.
        Runs made that way are not measured unless wrapped in `scheduler.running(name, size)`."""
        if attr.startswith("__"):
            raise AttributeError(attr)
        self.load()
        return getattr(self._backend, attr)
