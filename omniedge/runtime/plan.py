"""The memory plan for one budget: what stays resident, what loads on demand, the context that fits.

Arithmetic on measured numbers only: the process's own memory before any engine (base), each engine's
footprint once loaded, what its runs keep and how much a run grows (footprints.py), and the thinker's KV
cache, `kv_bytes_per_token` x context. Pinned engines stay loaded; the others load when a request needs
them. The context is the largest that fits beside the pinned engines while the hungriest engine runs.
The live side (loads, evictions, checks before every run) is scheduler.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omniedge.errors import OmniedgeError
from omniedge.runtime.footprints import EngineCost
from omniedge.runtime.manifest import Manifest
from omniedge.runtime.memory import mib

ENGINES = ("thinker", "vision", "audio")  # the thinker runs for every request; encoders for their media
MIN_CONTEXT = 256  # a budget must fit at least this many tokens (or the model's whole context if shorter)
DEFAULT_HEADROOM = 32 * 2**20  # kept free for what is not an engine: request bodies, decoded media, Python
PER_UNIT_FLOOR = {"thinker": 64}  # runs shorter than this (tokens) are dominated by fixed costs
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
