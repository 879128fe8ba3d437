"""One memory budget for every engine, kept live: a check before every load and run that never lets the
measured memory pass the budget, least-recently-used eviction of unpinned engines, and measurement of
what each load and run costs (recorded for the next plan, plan.py).

The scheduler talks to engines only through the EngineBackend protocol (load, unload, footprint_bytes,
run) and wraps each in a `ScheduledEngine` that the app uses in its place: every `run` first makes room
(evicting), loads if needed, and measures the run's peak with the meter (memory.py).
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
from omniedge.runtime.plan import PER_UNIT_FLOOR, BudgetError, Plan

__all__ = ["BudgetError", "ScheduledEngine", "Scheduler"]


def _run_size(name: str, inputs: Mapping[str, np.ndarray]) -> float:
    """The unit a run's memory grows with: tokens through the thinker, input bytes through an encoder."""
    if name == "thinker" and "inputs_embeds" in inputs:
        past = inputs.get("past_key_values.0.key")
        return float(inputs["inputs_embeds"].shape[1] + (past.shape[2] if past is not None else 0))
    return float(sum(np.asarray(a).nbytes for a in inputs.values()))


@dataclass
class SchedulerStats:
    loads: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    runs: Counter[str] = field(default_factory=Counter)
    over_budget: int = 0  # runs or loads whose measured peak passed the budget (should stay 0)


class Scheduler:
    """Keeps engines within one budget: live checks before each load and run, LRU eviction, pins."""

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
        self._held: dict[str, int] = {}  # bytes each loaded engine's runs left resident (arenas)
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
            self._make_room("", 0)

    def resident(self) -> list[str]:
        return [n for n, b in self.backends.items() if b.loaded]

    # ------------------------------------------------------------ room, load, unload

    def _limit(self) -> int:
        """What a load or run may fill up to. The plan keeps `headroom` above the base for memory that is
        not an engine's (it grows as requests come); a quarter of it stays free at every check for what
        other threads (request bodies arriving) allocate while an engine runs."""
        return self.plan.budget - self.plan.headroom_bytes // 4

    def _make_room(self, name: str, need: int) -> None:
        """Evict least recently used, unpinned engines (never `name`) until `need` more bytes fit."""
        trimmed = False
        while self.meter.current() + need > self._limit():
            if (
                not trimmed
            ):  # memory freed by earlier requests may still be held by malloc: cheaper than evicting
                release_freed_memory()
                trimmed = True
                continue
            victims = [n for n in self._lru if n != name and n not in self.plan.pinned]
            if not victims:
                now = self.meter.current()
                raise BudgetError(
                    f"{name} needs {mib(need)} more memory; {mib(now)} is in use and the budget is "
                    f"{mib(self.plan.budget)} ({mib(self.plan.headroom_bytes // 4)} of it kept free), with nothing "
                    "left to evict",
                    "raise --memory-budget, pin fewer engines, or send a shorter request",
                )
            self._unload(victims[0], evicted=True)

    def _unload(self, name: str, evicted: bool) -> None:
        self.backends[name].unload()
        self._lru.pop(name, None)
        self._held.pop(name, None)
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
            cost = self.costs[name]
            self._make_room(name, cost.load_peak_bytes)
            before = self.meter.current()
            self.meter.reset_peak()
            backend.load()
            peak = self.meter.peak()
            after = self.meter.current()
            self._check(peak)
            measured_load = max(backend.footprint_bytes(), after - before)
            if cost.measured:
                cost.load_bytes = max(cost.load_bytes, measured_load)
                cost.load_peak_bytes = max(cost.load_peak_bytes, peak - before)
            else:  # the first measurement replaces the weight-file estimate
                cost.load_bytes, cost.load_peak_bytes = measured_load, peak - before
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
    def running(self, name: str, size: float) -> Iterator[EngineBackend]:
        """Make room for a run of `size` units of `name`, load it, and measure the run's peak.

        No credit is taken for memory an engine kept from earlier runs (ONNX Runtime's arenas were seen
        to grow again on a repeated shape): every run needs room for its whole expected growth.
        """
        with self._lock:
            backend = self.backends[name]
            cost = self.costs[name]
            if backend.loaded:
                self._make_room(name, cost.expected_run(size))
            else:
                self._make_room(name, max(cost.load_peak_bytes, cost.load_bytes + cost.expected_run(size)))
            self.load(name)
            self._lru.move_to_end(name)
            before = self.meter.current()
            self.meter.reset_peak()
            try:
                yield backend
            finally:
                peak, after = self.meter.peak(), self.meter.current()
                self._check(peak)
                self._observe(name, size, max(0, peak - before), max(0, after - before))

    def _observe(self, name: str, size: float, grew: int, retained: int) -> None:
        cost = self.costs[name]
        held = self._held.get(name, 0) + retained
        self._held[name] = held
        first = cost.runs == 0 and not cost.measured
        cost.run_bytes = grew if first else max(cost.run_bytes, grew)
        cost.retained_bytes = held if first else max(cost.retained_bytes, held)
        if size >= PER_UNIT_FLOOR.get(name, 0) and size > 0:
            cost.run_bytes_per_unit = max(0.0 if first else cost.run_bytes_per_unit, grew / size)
        cost.runs += 1
        cost.measured = True
        self.stats.runs[name] += 1

    def run(self, name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.running(name, _run_size(name, inputs)) as backend:
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
