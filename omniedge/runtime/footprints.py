"""Engine footprints measured at load and run time, kept beside the bundle's manifest for planning.

They live in `BUNDLE/memory.json`, not in manifest.json: the manifest is the exporter's contract (its
files are hashed and checked, `omniedge build` rewrites it), while these numbers are the runtime's, per
machine and execution providers, and change as the runtime sees larger requests. Written atomically;
a read-only bundle keeps its numbers in memory only. Layout (docs/artifacts.md):

    {"schema": 2, "measurements": {"<providers>": {"meter": "process RSS", "onnxruntime": "1.23.2",
      "engines": {"vision": {"load_bytes": ..., "load_peak_bytes": ..., "run_bytes": ...,
                             "retained_bytes": ..., "run_bytes_per_unit": ..., "largest_run": ...,
                             "runs": 12}}}}}

A run's cost grows with its size (tokens through the thinker, image patches or audio tokens through an
encoder): `run_bytes_per_unit` is the largest growth per unit over long runs (at least half the largest
the plan assumes: a few MiB that another thread allocated during a short run would be multiplied by the
ratio of sizes if a short run set the rate), `run_bytes` the largest growth of a run too short for the
rate to cover its fixed costs (a decode step, a prompt of a few words). Every number is measured on a
heap just handed back to the system (scheduler.py), so a run that reuses memory an earlier one freed is
not mistaken for a small one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_json

FOOTPRINT_FILE = "memory.json"
SCHEMA = 2  # 1: measured with ONNX Runtime's CPU arena and without trimming the heap first
log = logging.getLogger("omniedge.memory")


@dataclass
class EngineCost:
    """Bytes one engine adds to the process, measured (or, before its first load, its weight files)."""

    load_bytes: int  # resident once loaded
    load_peak_bytes: int  # the peak growth while loading (graph parsing can hold weights twice)
    run_bytes: int  # largest peak growth of a short run (fixed costs: a decode step, a short prompt)
    retained_bytes: int = 0  # largest memory one run left resident that the heap could not hand back
    run_bytes_per_unit: float = 0.0  # largest peak growth per unit over long runs
    largest_run: float = 0.0  # the longest run measured (units): beyond it the cost is extrapolated
    runs: int = 0
    measured: bool = False

    @classmethod
    def from_weights(cls, weight_bytes: int) -> EngineCost:
        """Before an engine was ever loaded here: its weight files, with a load peak and a run of the same
        size again. Replaced by measurements at the first load and run."""
        w = weight_bytes
        return cls(load_bytes=w, load_peak_bytes=2 * w, run_bytes=w, retained_bytes=w)

    def expected_run(self, size: float) -> int:
        """Peak growth expected for a run of `size` units: the measured rate times the size, or what the
        largest short run took, whichever is more."""
        return int(max(self.run_bytes, self.run_bytes_per_unit * size))

    def observe_load(self, grew: int, peak: int) -> None:
        """A load measured: resident growth and peak growth (until a run was measured too, a load replaces
        the weight-file estimate)."""
        if self.measured:
            self.load_bytes = max(self.load_bytes, grew)
            self.load_peak_bytes = max(self.load_peak_bytes, peak)
        else:
            self.load_bytes, self.load_peak_bytes = grew, peak

    def observe_run(
        self, size: float, grew: int, retained: int | None, short_below: float, rate_from: float
    ) -> None:
        """A run of `size` units measured: its peak growth, and what it left resident (None: not measured,
        as for a decode step, whose heap is not trimmed). What it left counts as the engine's (its first
        run after a load sets up buffers that stay), the rest of the growth as the run's. Runs shorter than
        `short_below` units set the fixed cost, runs of `rate_from` units or more the rate; those between
        are covered by the rate and only counted."""
        if not self.measured:  # the first run replaces the weight-file estimates
            self.run_bytes = self.retained_bytes = 0
            self.run_bytes_per_unit = 0.0
        if retained is not None:
            self.retained_bytes = max(self.retained_bytes, retained)
            grew = max(0, grew - retained)
        if size < short_below or size <= 0:
            self.run_bytes = max(self.run_bytes, grew)
        elif size >= rate_from:
            self.run_bytes_per_unit = max(self.run_bytes_per_unit, grew / size)
        self.largest_run = max(self.largest_run, size)
        self.runs += 1
        self.measured = True


def _key(providers: list[str] | tuple[str, ...]) -> str:
    return ",".join(providers) or "CPUExecutionProvider"


class FootprintStore:
    """Reads and writes BUNDLE/memory.json for one set of execution providers."""

    def __init__(
        self, bundle_dir: str | Path, providers: list[str] | tuple[str, ...], meter_kind: str
    ) -> None:
        self.path = Path(bundle_dir) / FOOTPRINT_FILE
        self.key = _key(providers)
        self.meter_kind = meter_kind

    def _read_all(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {"schema": SCHEMA, "measurements": {}}
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            return {"schema": SCHEMA, "measurements": {}}
        raw.setdefault("measurements", {})
        return raw

    def read(self) -> dict[str, EngineCost]:
        """Measured costs per engine for these providers (empty when none was recorded)."""
        entry = self._read_all()["measurements"].get(self.key) or {}
        if entry.get("meter") not in (None, self.meter_kind):
            return {}  # measured with another meter (another machine kind): not comparable
        names = {f.name for f in fields(EngineCost)}
        out = {}
        for name, rec in (entry.get("engines") or {}).items():
            if isinstance(rec, dict) and {"load_bytes", "load_peak_bytes", "run_bytes"} <= set(rec):
                out[name] = EngineCost(**{k: v for k, v in rec.items() if k in names}, measured=True)
        return out

    def write(self, costs: dict[str, EngineCost]) -> bool:
        """Merge measured costs into the file (largest value wins); False when the bundle is read-only."""
        import onnxruntime

        measured = {n: c for n, c in costs.items() if c.measured}
        if not measured:
            return False
        raw = self._read_all()
        entry = raw["measurements"].setdefault(self.key, {})
        entry.update({"meter": self.meter_kind, "onnxruntime": onnxruntime.__version__})
        engines = entry.setdefault("engines", {})
        for name, cost in measured.items():
            old = engines.get(name) or {}
            rec = {k: v for k, v in asdict(cost).items() if k != "measured"}
            engines[name] = {k: max(v, old.get(k, v)) if k != "runs" else v for k, v in rec.items()}
        try:
            atomic_write_json(self.path, raw)
        except OSError as e:
            log.warning("could not record engine footprints in %s (%s); they stay in memory", self.path, e)
            return False
        return True
