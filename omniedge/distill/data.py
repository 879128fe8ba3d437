"""What the student learns from: a fixed, ordered list of examples, its fingerprint, and the batch plan.

Data comes from a training pack (`python -m omniedge.training.train pack`: what a GPU machine without the
data builders reads) or a dataset directory / suite name (`omni-mini`, `omni-mini-small`: features
computed the runtime's way). No augmentation: the teacher's logits for an example must not change
between the cache and the training step.

The batch plan is a pure function of (seed, step): each task's examples are drawn from its own seeded
permutation, epoch after epoch; the global batch of a step is split over processes and
gradient-accumulation micro-batches by position (slot = position mod processes x accumulation), so one
process with accumulation 2 and two processes without see the same micro-batches, and a resumed run
continues with exactly the batches it would have had.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.distill.settings import TASKS
from omniedge.errors import OmniedgeError
from omniedge.training.batches import IGNORE_INDEX, ChatTokens, Example, sequence


@dataclass
class DistillData:
    examples: list[Example]
    counts: np.ndarray  # predicted (labelled next-token) positions per example
    fingerprint: str
    description: dict[str, Any]
    by_task: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.by_task:
            for i, ex in enumerate(self.examples):
                self.by_task.setdefault(ex.task, []).append(i)

    @property
    def modalities(self) -> set[str]:
        """Input modalities the examples use: text always, image and audio when any example has them."""
        out = {"text"}
        for ex in self.examples:
            if ex.pixel_values is not None:
                out.add("image")
            if ex.mel is not None:
                out.add("audio")
        return out


def _sha_file(path: Path) -> str:
    from omniedge.checkpoint import file_sha256

    return file_sha256(path)


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """('pack' | 'dataset', directory) for a pack, a dataset directory or a suite name."""
    p = Path(source)
    if (p / "pack.json").is_file():
        return "pack", p
    from omniedge.eval.cli import resolve_suite

    try:
        return "dataset", resolve_suite(str(source))
    except OmniedgeError:
        raise OmniedgeError(
            f"{source} is neither a training pack (pack.json) nor a dataset directory or suite name",
            "pass a pack (python -m omniedge.training.train pack ...), a dataset directory built by "
            "omniedge.data, or `omni-mini` / `omni-mini-small`",
        ) from None


def _check_pack(pack: Path, tokenizer: Any, image_size: int) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from omniedge.training.pack import read_pack_meta

    meta = read_pack_meta(pack)
    if Tokenizer.from_file(str(pack / "tokenizer.json")).get_vocab() != tokenizer.get_vocab():
        raise OmniedgeError(
            f"the pack {pack} was made with another tokenizer than the teacher's",
            "make the pack with the teacher's tokenizer.json (train pack --tokenizer TEACHER/tokenizer.json)",
        )
    if int(meta.get("image_size", image_size)) != image_size:
        raise OmniedgeError(
            f"the pack {pack} holds {meta['image_size']} px images; the teacher reads {image_size} px",
            "make the pack at the teacher's image size",
        )
    return meta


def load_data(
    source: str | Path,
    split: str,
    tokenizer: Any,
    image_size: int,
    *,
    limit: int | None = None,
    tasks: Sequence[str] = TASKS,
    max_text_len: int = 256,
    progress: bool = False,
) -> DistillData:
    """Examples of `split` (train, val, test) from a pack or a dataset, in a fixed order."""
    from omniedge.training.batches import dataset_examples
    from omniedge.training.pack import load_pack_examples

    kind, root = resolve_source(source)
    ident: dict[str, Any] = {"kind": kind, "split": split, "limit": limit, "image_size": image_size}
    by_task: dict[str, list[Example]] = {}
    if kind == "pack":
        meta = _check_pack(root, tokenizer, image_size)
        ident["max_text_len"] = meta.get("max_text_len")
        for t in tasks:
            f = root / f"{t}_{split}.npz.xz"
            if f.is_file():
                by_task[t] = load_pack_examples(root, t, split)[:limit]
                ident[f.name] = _sha_file(f)
    else:
        manifest = root / "manifest.json"
        ident["dataset"] = (
            json.loads(manifest.read_text()).get("content_sha256") if manifest.is_file() else None
        )
        ident["max_text_len"] = max_text_len
        for t in tasks:
            f = root / t / f"{split}.jsonl"
            if f.is_file():
                if ident["dataset"] is None:
                    ident[f"{t}/{split}.jsonl"] = _sha_file(f)
                exs = dataset_examples(
                    tokenizer, root, t, split, image_size=image_size, max_text_len=max_text_len,
                    limit=limit, progress=progress,
                )  # fmt: skip
                by_task[t] = exs[:limit]
    examples = [ex for t in tasks for ex in by_task.get(t, [])]
    if not examples:
        raise OmniedgeError(
            f"{source} has no {split} examples of the tasks {list(tasks)}",
            "pass a pack or dataset that has that split (packs hold train and val)",
        )
    ct = ChatTokens.from_tokenizer(tokenizer)
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    counts = np.zeros(len(examples), np.int64)
    for i, ex in enumerate(examples):
        ids, labels = sequence(ct, ex)
        h.update(np.asarray(ids, np.int64).tobytes() + b"|" + np.asarray(labels, np.int64).tobytes())
        if ex.pixel_values is not None:
            h.update(np.asarray(ex.image_grid, np.int64).tobytes())
        if ex.mel is not None:
            h.update(np.asarray(ex.mel.shape, np.int64).tobytes())
        counts[i] = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    description = {
        "source": str(Path(root).resolve()),
        **ident,
        "examples": {t: len(v) for t, v in by_task.items()},
        "predicted_tokens": int(counts.sum()),
    }
    return DistillData(examples, counts, h.hexdigest(), description)


class BatchPlan:
    """Which examples every process uses in every micro-batch of every step (module docstring)."""

    def __init__(self, data: DistillData, per_task: dict[str, int], seed: int, world: int, accum: int):
        self.data, self.seed, self.world, self.accum = data, seed, world, accum
        self.per_task = {t: n for t, n in per_task.items() if n > 0 and data.by_task.get(t)}
        missing = sorted(t for t, n in per_task.items() if n > 0 and not data.by_task.get(t))
        if not self.per_task:
            raise OmniedgeError(
                f"the batch asks for {sorted(per_task)} but the data has only {sorted(data.by_task)}",
                "ask for tasks the data has (--batch)",
            )
        self.skipped = missing  # tasks asked for that the data lacks (reported, not an error)
        if self.global_size() < world * accum:
            raise OmniedgeError(
                f"a global batch of {self.global_size()} examples cannot feed {world} processes x "
                f"{accum} accumulation steps",
                "raise --batch or lower --grad-accum / the process count",
            )
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def global_size(self) -> int:
        return sum(self.per_task.values())

    def _perm(self, task: str, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, TASKS.index(task), epoch])
            self._perms[key] = rng.permutation(len(self.data.by_task[task]))
        return self._perms[key]

    def global_indices(self, step: int) -> list[int]:
        """Example indices of the whole step, task by task."""
        out: list[int] = []
        for task in TASKS:
            n = self.per_task.get(task, 0)
            pool = self.data.by_task.get(task, [])
            for pos in range(step * n, (step + 1) * n):
                epoch, off = divmod(pos, len(pool))
                out.append(pool[int(self._perm(task, epoch)[off])])
        return out

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's `accum` micro-batches of the step (slot = position mod world x accum)."""
        idx = self.global_indices(step)
        slots = self.world * self.accum
        return [idx[rank * self.accum + m :: slots] for m in range(self.accum)]

    def step_tokens(self, step: int) -> int:
        """Predicted positions in the whole step: the loss normaliser."""
        return int(self.data.counts[self.global_indices(step)].sum())

    def epochs_at(self, step: int) -> float:
        """Passes over the data at the end of `step` (the mean over tasks)."""
        return float(np.mean([(step + 1) * n / len(self.data.by_task[t]) for t, n in self.per_task.items()]))
