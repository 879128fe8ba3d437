"""The memory plan for one budget: what stays resident, what loads on demand, the context that fits.

Arithmetic on measured numbers only: the process's own memory before any engine (base), each engine's
footprint once loaded and what its runs leave, how much a run grows with its size (footprints.py), and
the thinker's KV cache, `kv_bytes_per_token` x context. Pinned engines stay loaded; the others load when
a request needs them. The context is the largest that fits beside the pinned engines while any engine
loads and runs the largest input it accepts: a prompt of the whole context through the thinker, one
image through the vision encoder, the longest audio the runtime takes through the audio encoder.

The scheduler (scheduler.py) decides residency with the same arithmetic (`engines_bytes`), so the least
budget for a context, `need(context)`, is one under which every request that fits the context runs at
the costs measured so far, evicting unpinned engines where they do not all fit; its meter then checks
the real memory.
On the CPU, ONNX Runtime's arena is off under a budget and the heap is handed back after each run, so a
run's growth is gone once it ends; with a GPU provider the device arena keeps it (`arenas`), so every
engine is planned with its largest run kept as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omniedge.errors import OmniedgeError
from omniedge.runtime.footprints import EngineCost
from omniedge.runtime.manifest import Manifest
from omniedge.runtime.memory import mib
from omniedge.runtime.preprocess import num_audio_tokens

ENGINES = ("thinker", "vision", "audio")  # the thinker runs for every request; encoders for their media
MIN_CONTEXT = 256  # a budget must fit at least this many tokens (or the model's whole context if shorter)
DEFAULT_HEADROOM = 32 * 2**20  # kept free for what is not an engine: request bodies, decoded media, Python
THINKER_FLOOR = 64  # prompt tokens below which a prefill is short: its fixed costs dominate its memory
_UNITS = {"thinker": "tokens", "vision": "patches", "audio": "audio tokens"}  # what a run's size counts
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


def run_units(m: Manifest) -> tuple[dict[str, float], dict[str, float]]:
    """Per encoder, the largest run it gets, and per engine the size below which a run is short (its
    fixed costs dominate), in the units the scheduler measures runs in (scheduler.run_size): prompt
    tokens, image patches (every image is resized to the one size the graph was built for) and audio
    tokens (the runtime takes at most `max_seconds`; log-mel has one frame per hop; a full chunk of
    `2 * n_window` frames, 1 s, is the shortest audio that is not short)."""
    largest: dict[str, float] = {}
    short_below: dict[str, float] = {"thinker": THINKER_FLOOR}
    if m.image is not None:
        t, h, w = m.image.grid_thw
        largest["vision"] = float(t * h * w)
    if m.audio is not None:
        a = m.audio
        frames = int(a.max_seconds * a.sampling_rate) // a.hop_length
        largest["audio"] = float(num_audio_tokens(frames, a.n_window))
        short_below["audio"] = float(num_audio_tokens(2 * a.n_window, a.n_window))
    return largest, short_below


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
    largest_runs: dict[str, float] = field(default_factory=dict)  # encoders: the largest run (units)
    short_below: dict[str, float] = field(default_factory=dict)  # per engine: see run_units
    arenas: bool = False  # runs keep what they grew (a GPU provider's device arena does not shrink)

    def fixed_bytes(self) -> int:
        return self.base_bytes + self.headroom_bytes

    def engine_room(self) -> int:
        """What the budget leaves to engines at this plan's context: the scheduler keeps engines in it."""
        return self.budget - self.fixed_bytes() - self.kv_bytes_per_token * self.max_context

    def largest_run(self, engine: str, context: int) -> float:
        """The largest run `engine` gets: a prompt of the whole context for the thinker."""
        return float(context) if engine == "thinker" else self.largest_runs.get(engine, 0.0)

    def run_bytes(self, engine: str, size: float) -> int:
        """Growth expected while `engine` runs `size` units (the one model the plan and scheduler share)."""
        return self.costs[engine].expected_run(size)

    def rate_from(self, engine: str) -> float:
        """Runs at least this long set an engine's rate (footprints.py): half the largest it gets here."""
        return max(self.short_below.get(engine, 0.0), self.largest_run(engine, self.max_context) / 2)

    def resident_bytes(self, engine: str, context: int) -> int:
        """An engine loaded, with what its runs leave (and, where arenas keep it, its largest run)."""
        c = self.costs[engine]
        if self.arenas:
            return c.load_bytes + max(
                c.retained_bytes, self.run_bytes(engine, self.largest_run(engine, context))
            )
        return c.load_bytes + c.retained_bytes

    def engines_bytes(
        self, loaded: Iterable[str], engine: str, size: float, context: int, loading: bool = True
    ) -> int:
        """Engine memory while `engine` runs `size` units beside the `loaded` ones: what each of them keeps,
        plus this one loaded and running (or its load peak, if it loads now and that is larger)."""
        others = sum(self.resident_bytes(e, context) for e in set(loaded) if e != engine)
        own = self.resident_bytes(engine, context) + self.run_bytes(engine, size)
        if loading:
            own = max(own, self.costs[engine].load_peak_bytes)
        return others + own

    def need_while(self, engine: str, context: int) -> int:
        """Peak the process may reach while `engine` loads and runs its largest input, with `context`
        tokens of KV cache and the pinned engines resident."""
        engines = self.engines_bytes(self.pinned, engine, self.largest_run(engine, context), context)
        return self.fixed_bytes() + self.kv_bytes_per_token * context + engines

    def need(self, context: int) -> int:
        return max(self.need_while(e, context) for e in self.costs)

    def all_resident_bytes(self, context: int) -> int:
        """Every engine loaded at once with what it keeps, while any runs its largest input: from this
        budget up, nothing is ever evicted."""
        engines = max(
            self.engines_bytes(self.costs, e, self.largest_run(e, context), context) for e in self.costs
        )
        return self.fixed_bytes() + self.kv_bytes_per_token * context + engines

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
            "  runs       up to "
            + ", ".join(
                f"{e} {self.largest_run(e, self.max_context):g} {_UNITS[e]} "
                f"({mib(self.run_bytes(e, self.largest_run(e, self.max_context)))})"
                for e in self.costs
            ),
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
    arenas: bool = False,
) -> Plan:
    """The plan for `budget`, or a BudgetError that names the bytes needed. `arenas`: the engines' runs
    keep what they grew (a GPU provider's device arena), so each is planned with its largest run kept."""
    engines = [e for e in ENGINES if e in costs]
    unknown = [p for p in pins if p not in engines]
    if unknown:
        raise OmniedgeError(f"cannot pin {unknown}: this bundle's engines are {engines}", "pin some of those")
    model_context = m.text.max_position_embeddings
    cap = model_context if max_context is None else min(max_context, model_context)
    if cap < 1:
        raise OmniedgeError(f"max_context must be >= 1, got {max_context}", "omit it to fit the budget")
    largest, short_below = run_units(m)
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
        largest_runs=largest,
        short_below=short_below,
        arenas=arenas,
    )
    floor = min(MIN_CONTEXT, cap)
    if plan.need(floor) > budget:
        worst = max(engines, key=lambda e: plan.need_while(e, floor))
        raise BudgetError(
            f"memory budget {mib(budget)} is below the {mib(plan.need(floor))} ({plan.need(floor)} bytes) this "
            f"bundle needs: base {mib(base_bytes)} + headroom {mib(headroom)} + pinned "
            f"{mib(sum(plan.resident_bytes(p, floor) for p in plan.pinned))} + {worst} loaded and running "
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
