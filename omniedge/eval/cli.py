"""`omniedge eval`: score a checkpoint on the omni-mini suite, or compare a teacher and a student.

    omniedge eval omni-mini                        # the committed teacher on the full test split
    omniedge eval out/mini-int4 --json eval.json   # any checkpoint of this architecture
    omniedge eval --compare omni-mini out/mini-int4  # retention table, as the reference article prints it

Suites: `omni-mini` (the full dataset, built and cached on first use), `omni-mini-small` (the small one,
for quick checks), a path to a dataset directory built by omniedge.data, or a training pack
(`python -m omniedge.training.train pack DATASET OUT --splits train,test`: a GPU machine without the data set
scores its test split, or its val split if it has no test split; audio as packed, at the pack's mel levels).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_json
from omniedge.errors import OmniedgeError
from omniedge.eval.metrics import retention
from omniedge.outputs import EVAL_JSON, check_replaceable_file

SUITES = {"omni-mini": "full", "omni-mini-small": "small"}
TASK_LABEL = {
    "text": "text perplexity",
    "image": "image QA accuracy",
    "speech": "speech WER",
    "mixed": "spoken QA about image",
}


def resolve_model(name: str) -> Path:
    """A built-in name (omni-mini, tiny) or a checkpoint directory."""
    if name in ("omni-mini", "omni_mini"):
        from omniedge.models.omni_mini import omni_mini_path

        return omni_mini_path()
    p = Path(name)
    if (p / "manifest.json").is_file() and not (p / "config.json").is_file():
        raise OmniedgeError(
            f"{p} is an engine bundle; `omniedge eval` scores checkpoints through transformers for now",
            "evaluate the checkpoint the bundle was exported from (the suite's Predictor is the hook for "
            "a runtime-backed predictor)",
        )
    from omniedge.models.registry import resolve_checkpoint

    return resolve_checkpoint(name)


def resolve_suite(suite: str) -> Path:
    """Dataset directory for a suite name (built on first use) or a dataset path."""
    if suite in SUITES:
        from omniedge.data import build_dataset

        return build_dataset(size=SUITES[suite], seed=0)
    p = Path(suite)
    if (
        (p / "manifest.json").is_file()
        or (p / "text" / "test.jsonl").is_file()
        or (p / "pack.json").is_file()
    ):
        return p
    raise OmniedgeError(
        f"unknown suite {suite!r}",
        f"use one of {sorted(SUITES)}, the path of a dataset built by omniedge.data, or a training pack "
        "(python -m omniedge.training.train pack DATASET OUT --splits train,test)",
    )


def _pack_split(root: Path) -> str | None:
    """The split a training pack is scored on (test if it has one, else val); None for a dataset."""
    from omniedge.training.pack import read_pack_meta

    if not (root / "pack.json").is_file():
        return None
    counts = read_pack_meta(root).get("counts", {})
    return "test" if any(k.endswith("/test") for k in counts) else "val"


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OmniedgeError("--device cuda asked for, but torch sees no CUDA GPU", "use --device cpu")
    return device


def evaluate(
    model: str | Path,
    suite: str = "omni-mini",
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the suite on one checkpoint; JSON-ready result with model, dataset and timing metadata."""
    from omniedge.checkpoint import load_checkpoint, read_meta
    from omniedge.eval.suite import TorchPredictor, load_suite_data, run_suite

    path = resolve_model(str(model))
    root = resolve_suite(suite)
    dev = _device(device)
    meta = read_meta(path)
    image_size = int(meta.get("preprocess", {}).get("image_size", 64))
    t0 = time.perf_counter()
    net, tok = load_checkpoint(path)
    predictor = TorchPredictor(net, tok, device=dev, image_size=image_size)
    split = _pack_split(root)
    if split is None:
        data = load_suite_data(root, tok, image_size, limit=limit, progress=progress)
    else:  # a training pack (a GPU machine without the data set): features as packed
        from omniedge.eval.suite import suite_data_from_pack

        data = suite_data_from_pack(root, split, limit)
    result = run_suite(predictor, data, progress=progress)
    manifest = root / "manifest.json"
    return {
        "schema": 1,
        "suite": suite,
        "model": str(path),
        "device": dev,
        "dataset": {
            "root": str(root),
            "content_sha256": json.loads(manifest.read_text()).get("content_sha256")
            if manifest.is_file()
            else None,
            "split": split or "test",
            "pack": split is not None,
            "limit": limit,
        },
        **result,
        "seconds_total": round(time.perf_counter() - t0, 1),
    }


def _fmt(metric: str, v: float, unit: bool = True) -> str:
    if metric == "perplexity":
        return f"{v:.2f}"
    return f"{100 * v:.1f}%" + (" WER" if metric == "wer" and unit else "")


def format_result(res: dict[str, Any]) -> str:
    """Per-task table: score, 95% CI, n, trivial baseline."""
    lines = [f"model {res['model']}  suite {res['suite']}  device {res['device']}", ""]
    lines.append(f"{'task':<24}{'score':>12}{'95% CI':>22}{'n':>7}   baseline")
    for task, r in res["tasks"].items():
        m = r["metric"]
        base = next(iter(r.get("baseline", {}).items()), None)
        btxt = f"{base[0]} {_fmt(m, base[1]['value'])}" if base else ""
        ci = f"[{_fmt(m, r['lo'], False)}, {_fmt(m, r['hi'], False)}]"
        lines.append(f"{TASK_LABEL.get(task, task):<24}{_fmt(m, r['value']):>12}{ci:>22}{r['n']:>7}   {btxt}")
    if "experts" in res:
        from omniedge.eval.experts import format_report

        lines += ["", "expert load on the test split (uniform: entropy 1.0, top-25% share 0.25)"]
        lines.append(format_report(res["experts"]))
    return "\n".join(lines)


def retention_table(teacher: dict[str, Any], student: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The article's table (task, teacher, student, retention); WER and perplexity retained as the inverse."""
    rows: dict[str, Any] = {}
    lines = [f"{'task':<24}{'teacher':>16}{'student':>16}{'retention':>11}"]
    for task, t in teacher["tasks"].items():
        s = student["tasks"].get(task)
        if s is None:
            continue
        m = t["metric"]
        r = retention(t["value"], s["value"], t["lower_is_better"])
        rows[task] = {"metric": m, "teacher": t["value"], "student": s["value"], "retention": r}
        lines.append(
            f"{TASK_LABEL.get(task, task):<24}{_fmt(m, t['value']):>16}{_fmt(m, s['value']):>16}{100 * r:>10.1f}%"
        )
    return "\n".join(lines), rows


def eval_cli(
    model: str | None,
    suite: str = "omni-mini",
    compare: tuple[str, str] | None = None,
    json_path: Path | None = None,
    device: str = "cpu",
    limit: int | None = None,
) -> dict[str, Any]:
    """Entry point of `omniedge eval`: prints the table(s) and writes JSON when asked. `limit`: only the
    first N test examples of each task (quicker, wider intervals; recorded in the JSON)."""
    if limit is not None and limit < 1:
        raise OmniedgeError(
            f"--limit {limit} leaves nothing to evaluate", "give --limit >= 1, or leave it out"
        )
    if json_path is not None:
        check_replaceable_file(json_path, EVAL_JSON)  # before minutes of evaluation
    if compare is not None:
        teacher_name, student_name = compare
        teacher = evaluate(teacher_name, suite, device, limit)
        student = evaluate(student_name, suite, device, limit)
        table, rows = retention_table(teacher, student)
        print(format_result(teacher), "\n", format_result(student), "\n", sep="\n")
        print(table)
        out: dict[str, Any] = {"schema": 1, "teacher": teacher, "student": student, "retention": rows}
    else:
        if not model:
            raise OmniedgeError("no model to evaluate", "pass a checkpoint directory or `omni-mini`")
        out = evaluate(model, suite, device, limit)
        print(format_result(out))
    if json_path is not None:
        atomic_write_json(json_path, out)
        print(f"\nwrote {json_path}")
    return out
