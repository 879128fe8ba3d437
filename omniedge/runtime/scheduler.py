"""One memory budget for every engine: which engines stay resident, which load on demand, how long a
context fits, and a live check before every load and run that never lets measured memory pass the budget.

The plan (`plan_memory`) is arithmetic on measured numbers: the process's own memory before any engine
(base), each engine's footprint once loaded and its peak growth while running (footprints.py), and the
thinker's KV cache, `kv_bytes_per_token` x context. Pinned engines stay loaded; the others load when a
request needs them and are evicted least recently used first when room is needed. The context is the
largest that fits beside the pinned engines while the hungriest engine runs.

The scheduler (`Scheduler`) talks to engines only through the EngineBackend protocol (load, unload,
footprint_bytes, run) and wraps each in a `ScheduledEngine` that the app uses in its place: every `run`
first makes room (evicting), loads if needed, and measures the run's peak with the meter (memory.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.runtime.backends import EngineBackend
from omniedge.runtime.footprints import EngineCost, FootprintStore
from omniedge.runtime.manifest import Manifest
from omniedge.runtime.memory import MemoryMeter, mib, release_freed_memory

ENGINES = ("thinker", "vision", "audio")  # the thinker runs for every request; encoders for their media
MIN_CONTEXT = 256  # a budget must fit at least this many tokens (or the model's whole context if shorter)
DEFAULT_HEADROOM = 32 * 2**20  # kept free for what is not an engine: request bodies, decoded media, Python
_PER_UNIT_FLOOR = {"thinker": 64}  # runs shorter than this (tokens) are dominated by fixed costs
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1, "uint8": 1}


class BudgetError(OmniedgeError):
    """The memory budget cannot hold what is asked (at start, or for one request)."""


def kv_bytes_per_token(m: Manifest) -> int:
    """Bytes of KV cache per context token: 2 (key, value) x layers x KV heads x head_dim x the element
    size of the thinker graph's `past_key_values.*` inputs (4 for float32, 2 for float16)."""
    thinker = m.components["thinker"]
    dtypes = {t.dtype for t in thinker.inputs if t.name.startswith("past_key_values.")}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_BYTES:
        raise OmniedgeError(
            f"bundle {m.root}: the thinker's past_key_values inputs have dtypes {sorted(dtypes) or 'none'}",
            "re-export the bundle: the manifest must list the thinker's KV inputs with one float dtype",
        )
    t = m.text
    return 2 * t.num_layers * t.num_kv_heads * t.head_dim * _DTYPE_BYTES[dtypes.pop()]


@dataclass
class Plan:
    """What stays resident, what loads on demand, and the context that fits, for one budget."""

    budget: int
    base_bytes: int
    headroom_bytes: int
    kv_bytes_per_token: int
    max_context: int
    model_context: int
    pinned: tuple[str, ...]
    on_demand: tuple[str, ...]
    costs: dict[str, EngineCost]
    meter: str

    def fixed_bytes(self) -> int:
        return self.base_bytes + self.headroom_bytes

    def _run(self, engine: str, context: int) -> int:
        c = self.costs[engine]
        return c.expected_run(context) if engine == "thinker" else c.run_bytes

    def _resident(self, engine: str, context: int) -> int:
        """An engine loaded, with what its runs keep (ONNX Runtime's arenas do not shrink; the thinker's
        grow with the longest prompt, so up to a run at the full context)."""
        c = self.costs[engine]
        kept = max(c.retained_bytes, self._run(engine, context)) if engine == "thinker" else c.retained_bytes
        return c.load_bytes + kept

    def need_while(self, engine: str, context: int) -> int:
        """Peak the process may reach while `engine` loads and runs, with `context` tokens of KV cache:
        the pinned engines as they stay, this one loaded with what it keeps, and one more run's growth."""
        pinned = sum(self._resident(p, context) for p in self.pinned if p != engine)
        c = self.costs[engine]
        own = self._resident(engine, context) + self._run(engine, context)
        if engine not in self.pinned:
            own = max(own, c.load_peak_bytes)
        return self.fixed_bytes() + self.kv_bytes_per_token * context + pinned + own

    def need(self, context: int) -> int:
        return max(self.need_while(e, context) for e in self.costs)

    def all_resident_bytes(self, context: int) -> int:
        """Every engine loaded at once with what it keeps, plus one run: above this nothing is evicted."""
        resident = sum(self._resident(e, context) for e in self.costs)
        run = max(self._run(e, context) for e in self.costs)
        return self.fixed_bytes() + self.kv_bytes_per_token * context + resident + run

    def describe(self) -> list[str]:
        kv = self.kv_bytes_per_token
        unmeasured = [n for n, c in self.costs.items() if not c.measured]
        lines = [
            f"memory plan  budget {mib(self.budget)} ({self.meter})",
            f"  base       {mib(self.base_bytes)} (runtime, tokenizer, embeddings) + {mib(self.headroom_bytes)} headroom",
            "  resident   "
            + (", ".join(f"{p} {mib(self.costs[p].load_bytes)} (pinned)" for p in self.pinned) or "none"),
            "  on demand  "
            + (
                ", ".join(f"{e} {mib(self.costs[e].load_bytes)}" for e in self.on_demand)
                + " (loaded when a request needs them; least recently used evicted first)"
                if self.on_demand
                else "none"
            ),
            f"  context    {self.max_context} tokens of {self.model_context}: KV cache {mib(kv * self.max_context)}"
            f" ({kv} bytes per token)",
            f"  peak       at most {mib(self.need(self.max_context))}; every engine resident at once would take "
            f"{mib(self.all_resident_bytes(self.max_context))}",
        ]
        if unmeasured:
            lines.append(
                f"  estimated  {', '.join(unmeasured)}: not measured here yet (weight file sizes); "
                "`omniedge serve` measures them at start and records them in memory.json"
            )
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "base_bytes": self.base_bytes,
            "headroom_bytes": self.headroom_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_context": self.max_context,
            "pinned": list(self.pinned),
            "on_demand": list(self.on_demand),
            "peak_bound_bytes": self.need(self.max_context),
            "all_resident_bytes": self.all_resident_bytes(self.max_context),
            "min_budget_bytes": self.need(min(MIN_CONTEXT, self.model_context)),
            "measured": sorted(n for n, c in self.costs.items() if c.measured),
        }


def plan_memory(
    m: Manifest,
    budget: int,
    base_bytes: int,
    costs: Mapping[str, EngineCost],
    pins: Sequence[str] = ("thinker",),
    max_context: int | None = None,
    headroom: int = DEFAULT_HEADROOM,
    meter: str = "process RSS",
) -> Plan:
    """The plan for `budget`, or a BudgetError that names the bytes needed."""
    engines = [e for e in ENGINES if e in costs]
    unknown = [p for p in pins if p not in engines]
    if unknown:
        raise OmniedgeError(f"cannot pin {unknown}: this bundle's engines are {engines}", "pin some of those")
    model_context = m.text.max_position_embeddings
    cap = model_context if max_context is None else min(max_context, model_context)
    if cap < 1:
        raise OmniedgeError(f"max_context must be >= 1, got {max_context}", "omit it to fit the budget")
    plan = Plan(
        budget=budget,
        base_bytes=base_bytes,
        headroom_bytes=headroom,
        kv_bytes_per_token=kv_bytes_per_token(m),
        max_context=cap,
        model_context=model_context,
        pinned=tuple(e for e in engines if e in pins),
        on_demand=tuple(e for e in engines if e not in pins),
        costs={e: costs[e] for e in engines},
        meter=meter,
    )
    floor = min(MIN_CONTEXT, cap)
    if plan.need(floor) > budget:
        worst = max(engines, key=lambda e: plan.need_while(e, floor))
        raise BudgetError(
            f"memory budget {mib(budget)} is below the {mib(plan.need(floor))} ({plan.need(floor)} bytes) this "
            f"bundle needs: base {mib(base_bytes)} + headroom {mib(headroom)} + pinned "
            f"{mib(sum(plan._resident(p, floor) for p in plan.pinned))} + {worst} loaded and running "
            f"+ KV cache for {floor} tokens",
            f"give --memory-budget {mib(plan.need(floor) + 2**20).replace(' ', '')} or more"
            + (", or pin fewer engines" if len(plan.pinned) > 1 else ""),
        )
    lo, hi = floor, cap  # the largest context that fits: need() grows with the context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan.need(mid) <= budget else (lo, mid - 1)
    if max_context is not None and lo < cap:
        raise BudgetError(
            f"a context of {cap} tokens does not fit the memory budget {mib(budget)}: it fits {lo}",
            f"ask for --max-context {lo} or less, or raise the budget to {mib(plan.need(cap))}",
        )
    plan.max_context = lo
    return plan


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
        if size >= _PER_UNIT_FLOOR.get(name, 0) and size > 0:
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
