"""`omniedge eval`'s suite during distillation: before, every N steps, after; and the share recovered.

The suite is the one `omniedge eval` runs (omniedge.eval.suite) on a held-out subset: a pack's val split
(what a GPU machine has), or a dataset's test split (as `omniedge eval --suite DATASET`).
"""

from __future__ import annotations

from typing import Any


def suite_data(source: Any, tokenizer: Any, image_size: int, limit: int) -> Any:
    """SuiteData of `limit` examples per task from a pack (val split) or a dataset (test split)."""
    from omniedge.distill.data import resolve_source
    from omniedge.eval.suite import load_suite_data, suite_data_from_pack

    kind, root = resolve_source(source)
    if kind == "pack":
        return suite_data_from_pack(root, "val", limit)
    return load_suite_data(root, tokenizer, image_size, limit=limit, progress=False)


def score(model: Any, tokenizer: Any, data: Any, device: Any, image_size: int) -> dict[str, Any]:
    """run_suite on `model` (a thinker, its peft wrapper, or a full model); training mode restored."""
    from torch.nn.utils import parametrize

    from omniedge.eval.suite import TorchPredictor, run_suite

    was_training = model.training
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    predictor = TorchPredictor(model, tokenizer, device=str(device), image_size=image_size, batch_size=32)
    with parametrize.cached():  # fake-INT4 weights: quantized once per eval, not per expert per token
        res = run_suite(predictor, data, collect_experts=False, progress=False)
    if impl and impl != "eager" and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    model.train(was_training)
    return res


def values(res: dict[str, Any] | None) -> dict[str, float]:
    return {t: float(r["value"]) for t, r in (res or {}).get("tasks", {}).items()}


def recovered_share(
    teacher: dict[str, Any] | None, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> dict[str, float | None]:
    """Per task, (after - before) / (teacher - before): the part of what pruning / INT4 lost that
    distillation won back (1 = all of it; None where the student lost nothing to win back)."""
    t, b, a = values(teacher), values(before), values(after)
    out: dict[str, float | None] = {}
    for task in t:
        if task in b and task in a:
            gap = t[task] - b[task]
            out[task] = None if abs(gap) < 1e-12 else round((a[task] - b[task]) / gap, 4)
    return out


def retention_of(teacher: dict[str, Any] | None, student: dict[str, Any] | None) -> dict[str, float]:
    """Per task, the student's score as a share of the teacher's (`omniedge eval --compare`'s retention)."""
    from omniedge.eval.metrics import retention

    out = {}
    for task, r in (teacher or {}).get("tasks", {}).items():
        s = (student or {}).get("tasks", {}).get(task)
        if s is not None:
            out[task] = round(retention(r["value"], s["value"], r["lower_is_better"]), 4)
    return out


def line(res: dict[str, Any] | None) -> str:
    """One line: task=value [lo, hi] per task."""
    parts = []
    for task, r in (res or {}).get("tasks", {}).items():
        if r["metric"] == "perplexity":
            parts.append(f"{task} ppl {r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]")
        else:
            parts.append(
                f"{task} {r['metric']} {100 * r['value']:.1f}% [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]"
            )
    return "; ".join(parts)
