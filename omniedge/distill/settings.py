"""Everything that decides a distillation run, validated once; recorded in omniedge.json and in the run key.

`DistillSettings.from_mapping` reads the same fields from a dict (the `distill` stage of compress recipes,
omniedge/distill/recipe_stage.py), with one clear error per mistake, so the CLI and a recipe cannot drift
apart.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omniedge.distill.loss import LossWeights
from omniedge.errors import OmniedgeError

TASKS = ("text", "image", "speech", "mixed")
TRAIN_CHOICES = ("all", "experts", "lora")
INT4_CHOICES = ("auto", "none", "after", "qat")
PRECISIONS = ("auto", "bf16", "fp32")
# Fields that change what a run computes; the rest (how often to save, log, evaluate) do not.
_NOT_IN_KEY = ("save_every", "eval_every", "eval_limit", "log_every", "loader_workers")


def default_batch() -> dict[str, int]:
    """Examples per task in one optimizer step (all processes together): omni-mini's training mix."""
    return {"text": 32, "image": 128, "speech": 96, "mixed": 32}


@dataclass
class DistillSettings:
    """One distillation run. `batch` is the GLOBAL batch per task; it is split over processes and
    gradient-accumulation micro-batches, so the result does not depend on how many GPUs run it."""

    seed: int = 0
    steps: int | None = None  # None: decided by time_budget_s after a few measured steps
    time_budget_s: float = 300.0
    batch: dict[str, int] = field(default_factory=default_batch)
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 2.0
    ce_weight: float = 0.7
    kl_weight: float = 0.3
    top_k: int | None = None  # teacher logits kept per position; None: all (on the fly only)
    train: str = "all"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    int4: str = "auto"  # auto: "after" when the student is INT4, else "none"
    router_aux: float = 0.0  # x the Switch load-balancing loss of the student's routers
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    limit: int | None = None  # first N training examples per task
    max_text_len: int = 256
    save_every: int = 100
    eval_every: int = 0  # 0: evaluate before and after only
    eval_limit: int = 64  # examples per task for the evals; 0: no evaluation
    log_every: int = 10
    loader_workers: int | None = None  # batch-making processes; None: 4 on CUDA, 0 (in process) on the CPU
    fresh_speech: bool = False  # speech and spoken questions made afresh each step (distill/fresh.py)
    mixed_kinds: dict[str, float] | None = None  # with fresh_speech: sampling weight per spoken-question kind

    def __post_init__(self) -> None:
        self.loss_weights()  # validates temperature and weights
        for name in ("grad_accum", "warmup_steps", "max_text_len", "save_every", "log_every", "lora_rank"):
            v = getattr(self, name)
            lo = 0 if name == "warmup_steps" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise OmniedgeError(
                    f"distill {name} = {v!r} is not an integer >= {lo}", f"give {name} >= {lo}"
                )
        for name in ("steps", "top_k", "limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise OmniedgeError(f"distill {name} = {v!r} is not a positive integer", f"give {name} >= 1")
        for name in ("lr", "time_budget_s", "lora_alpha"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise OmniedgeError(f"distill {name} = {v!r} is not a positive number", f"give {name} > 0")
        if self.loader_workers is not None and (
            isinstance(self.loader_workers, bool)
            or not isinstance(self.loader_workers, int)
            or self.loader_workers < 0
        ):
            raise OmniedgeError(
                f"distill loader_workers = {self.loader_workers!r} is not an integer >= 0", "give 0 or more"
            )
        if not isinstance(self.fresh_speech, bool):
            raise OmniedgeError(
                f"distill fresh_speech = {self.fresh_speech!r} is not true or false", "give true or false"
            )
        if self.mixed_kinds is not None:
            from omniedge.training.synth import check_mixed_kind_weight

            if not isinstance(self.mixed_kinds, dict):
                raise OmniedgeError(
                    f"distill mixed_kinds {self.mixed_kinds!r} is not a mapping", 'e.g. {"where": 3}'
                )
            if not self.fresh_speech:
                raise OmniedgeError(
                    "mixed_kinds weighs the spoken questions made afresh each step, and fresh speech is off",
                    "add --fresh-speech (and a training pack as --data), or drop --mixed-kinds",
                )
            self.mixed_kinds = check_mixed_kind_weight(self.mixed_kinds)
        if self.eval_every < 0 or self.eval_limit < 0:
            raise OmniedgeError("distill eval_every and eval_limit must be >= 0", "fix the values")
        for name, choices in (("train", TRAIN_CHOICES), ("int4", INT4_CHOICES), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise OmniedgeError(
                    f"distill {name} = {getattr(self, name)!r} is not supported",
                    f"use one of {list(choices)}",
                )
        if not isinstance(self.batch, dict) or not self.batch:
            raise OmniedgeError(
                f"distill batch {self.batch!r} is not a mapping", 'e.g. {"text": 32, "image": 32}'
            )
        unknown = sorted(set(self.batch) - set(TASKS))
        if unknown:
            raise OmniedgeError(f"distill batch names unknown task(s) {unknown}", f"tasks are {list(TASKS)}")
        for t, n in self.batch.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise OmniedgeError(f"distill batch[{t}] = {n!r} is not an integer >= 0", "give counts >= 0")
        if sum(self.batch.values()) == 0:
            raise OmniedgeError("distill batch is empty (every task 0)", "give at least one task a count")
        if self.train == "lora" and self.int4 == "qat":
            raise OmniedgeError(
                "LoRA with quantization-aware training is not supported: the adapters add their update "
                "outside the fake-quantized weight",
                "use --int4 after with --train lora, or --train all/experts with --int4 qat",
            )

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.temperature, self.ce_weight, self.kl_weight)

    def global_batch(self) -> int:
        return sum(self.batch.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "distill") -> DistillSettings:
        """Settings from a dict (a recipe stage's body); unknown fields are one clear error."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise OmniedgeError(f"{where}: expected a mapping, got {raw!r}", "write `key: value` pairs")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise OmniedgeError(f"{where}: unknown field(s) {unknown}", f"use only {sorted(known)}")
        out = cls(**raw)
        if isinstance(raw.get("batch"), dict):  # a partial batch keeps the other tasks' defaults
            out.batch = {**default_batch(), **raw["batch"]}
            out.__post_init__()
        return out


def run_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (identities of teacher, student, data; the settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
