"""Loading an `Omni` under a memory budget: plan, measure what was never measured, plan again, start.

The first start on a machine measures every engine with a few short requests (text, an image, the
longest audio the bundle takes), under the budget's live checks, and records the numbers in
BUNDLE/memory.json; later starts plan from those numbers at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from omniedge.runtime.backends import EngineBackend
from omniedge.runtime.footprints import EngineCost, FootprintStore
from omniedge.runtime.manifest import Manifest
from omniedge.runtime.memory import MemoryMeter, default_meter, free_bytes, parse_budget
from omniedge.runtime.plan import DEFAULT_HEADROOM, Plan, plan_memory
from omniedge.runtime.scheduler import Scheduler

if TYPE_CHECKING:
    from omniedge.runtime.app import Omni

_PROBE_TEXT = "Describe what you see and hear, in plain words, step by step. " * 8  # ~100 tokens


def _weight_bytes(m: Manifest, name: str) -> int:
    c = m.components[name]
    return c.weight_bytes or (c.onnx.stat().st_size if c.onnx is not None and c.onnx.is_file() else 0)


def _providers(backends: Mapping[str, EngineBackend]) -> list[str]:
    first = next(iter(backends.values()), None)
    return list(getattr(first, "providers", None) or ["CPUExecutionProvider"])


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
    plan = plan_memory(m, budget_bytes, base_bytes, costs, pins, max_context, headroom, meter.kind)
    return plan, store


def _probe_requests(omni: Omni) -> list[dict]:
    """Short requests that run every engine once, the thinker with a long prefill, audio at its longest."""
    m = omni.manifest
    reqs: list[dict] = [{"prompt": _PROBE_TEXT}]
    if m.image is not None:
        h, w = m.image.size
        y, x = np.mgrid[0 : 2 * h, 0 : 2 * w]
        reqs.append(
            {
                "prompt": "What is this?",
                "image": np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8),
            }
        )
    if m.audio is not None:
        per_s = m.position_id_per_seconds or 13
        seconds = max(1.0, min(m.audio.max_seconds, (omni.max_context - 64) / per_s))
        t = np.arange(int(seconds * m.audio.sampling_rate)) / m.audio.sampling_rate
        wav = (0.2 * np.sin(2 * np.pi * (120 + 40 * np.sin(t)) * t)).astype(np.float32)
        reqs.append({"prompt": "What was said?", "audio": (wav, m.audio.sampling_rate)})
    return reqs


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
) -> Omni:
    """An Omni whose engines run through a Scheduler; BudgetError at once when the budget cannot work."""
    providers = _providers(backends)
    meter = meter or default_meter(providers)
    base = meter.current() + int(embed.nbytes)  # the embedding table is mapped: count it whole
    plan, store = plan_for(m, budget, list(backends), providers, meter, base, pins, max_context, headroom)
    scheduler = Scheduler(backends, plan, meter, store)
    if not all(c.measured for c in plan.costs.values()):
        probe = cls(m, tokenizer, embed, scheduler.engines, max_context=plan.max_context)
        probe.scheduler = scheduler  # its runs (the thinker's prefill too) go through the scheduler
        for req in _probe_requests(probe):
            probe.chat(max_new_tokens=2, **req)
        del probe
        scheduler.save()
        for name in plan.on_demand:  # start as planned: only the pinned engines resident
            scheduler.unload(name)
    scheduler.start()
    # Plan again from what was just measured (pinned engines loaded): this may shorten the context or refuse.
    scheduler.plan = plan_memory(
        m, plan.budget, base, scheduler.costs, pins, max_context, headroom, meter.kind
    )
    omni = cls(
        m, tokenizer, embed, scheduler.engines, max_context=scheduler.plan.max_context, max_queue=max_queue
    )
    omni.scheduler = scheduler
    return omni
