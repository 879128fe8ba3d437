"""What lets a training run stop and go on: the divergence guard's snapshots, and the run state written
between device calls (weights, CTC head, optimizer, where in which phase, the log so far).

A run state is a directory (`--state DIR`) holding state.json (progress, settings, log) and state.pt
(tensors), written into a temporary sibling and renamed (omniedge.atomic), so a call cut short leaves the
previous state whole.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.errors import OmniedgeError
from omniedge.outputs import OutputKind

STATE_SCHEMA = 1
TRAINING_STATE = OutputKind(
    "training run state",
    "state.json",
    "omniedge.training.train --state",
    lambda p: '"omniedge-training-state"' in p.read_text(encoding="utf-8", errors="replace"),
)


class DivergenceGuard:
    """Keeps a snapshot of weights and optimizer state every 100 good steps; on a non-finite loss or
    gradient it skips the update, restores the snapshot and halves the learning rate."""

    def __init__(self, model: Any, opt: Any, every: int = 100, lr_scale: float = 1.0) -> None:
        self.model, self.opt, self.every = model, opt, every
        self.lr_scale, self.rollbacks = lr_scale, []
        self.snap: tuple[dict[str, Any], dict[str, Any]] | None = None

    def check(self, step: int, grad_norm: float, loss: float) -> bool:
        if math.isfinite(grad_norm) and math.isfinite(loss):
            if step % self.every == 1 or self.snap is None:
                self.snap = (
                    {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                    copy.deepcopy(self.opt.state_dict()),
                )
            return True
        self.opt.zero_grad(set_to_none=True)
        if self.snap is not None:
            self.model.load_state_dict(self.snap[0])
            self.opt.load_state_dict(self.snap[1])
        self.lr_scale *= 0.5
        self.rollbacks.append(step)
        print(f"\nstep {step}: non-finite loss/gradient -> rolled back, lr x{self.lr_scale:g}", flush=True)
        return False


@dataclass
class RunState:
    """Where a run is: the phase it is in, its step there, each phase's step count once fixed."""

    settings: dict[str, Any]  # the TrainConfig as a dict: a resumed run must use the same
    phase: int = 0
    step: int = 0  # steps done in the current phase
    totals: list[int | None] = field(default_factory=list)  # steps per phase (None until measured)
    seconds: list[float] = field(default_factory=list)  # training seconds spent per phase
    segments: list[dict[str, Any]] = field(default_factory=list)  # one per call: phase, first/last step
    curve: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)
    lr_scale: float = 1.0
    kernels: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"kind": "omniedge-training-state", "schema": STATE_SCHEMA, **self.__dict__}


def save_state(path: str | Path, state: RunState, tensors: dict[str, Any]) -> None:
    """Write the run state (JSON + tensors) atomically, replacing a previous state."""
    import torch

    with atomic_dir(path, TRAINING_STATE) as tmp:
        torch.save(tensors, tmp / "state.pt")
        atomic_write_json(tmp / "state.json", state.as_json())


def load_state(path: str | Path) -> tuple[RunState, dict[str, Any]] | None:
    """(state, tensors) of a previous call, or None when `path` holds none yet."""
    import json

    import torch

    p = Path(path)
    if not (p / "state.json").is_file():
        if p.exists() and any(p.iterdir()):
            raise OmniedgeError(
                f"{p} is not a training run state (no state.json)", "pass a new or empty --state directory"
            )
        return None
    raw = json.loads((p / "state.json").read_text())
    if raw.get("kind") != "omniedge-training-state" or raw.get("schema") != STATE_SCHEMA:
        raise OmniedgeError(f"{p}/state.json is not a run state of this version", "start a new --state")
    fields = {k: v for k, v in raw.items() if k in RunState.__dataclass_fields__}
    return RunState(**fields), torch.load(p / "state.pt", map_location="cpu", weights_only=False)


def settings_differ(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...]) -> list[str]:
    """Names of the settings that differ between a saved run and this call (except `ignore`)."""
    keys = (set(old) | set(new)) - set(ignore)
    return sorted(k for k in keys if _norm(old.get(k)) != _norm(new.get(k)))


def _norm(v: Any) -> Any:
    import json

    return json.loads(json.dumps(v))  # tuples and lists compare equal, as they do after a JSON round trip
