"""Retention tables from `omniedge eval --json` results: one teacher, any number of students.

    python -m omniedge.bench.retention teacher.json "REAP 50%=reap.json" "frequency 50%=freq.json"

prints a Markdown table: per student and task, the score with its 95% interval and the retention
(student / teacher; teacher / student for perplexity and WER, as `omniedge eval --compare` computes it).
Every result must come from the same suite and test examples (same dataset hash and `--limit`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omniedge.errors import OmniedgeError
from omniedge.eval.metrics import retention

TASKS = {"text": "text ppl", "image": "image QA", "speech": "speech WER", "mixed": "spoken QA"}


def read_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        out = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OmniedgeError(
            f"cannot read eval result {p}: {e}", "pass files written by `omniedge eval --json`"
        ) from e
    if "tasks" not in out or "dataset" not in out:
        raise OmniedgeError(f"{p} is not an `omniedge eval --json` result", "pass one eval result per model")
    return out


def _score(t: dict[str, Any]) -> str:
    if t["metric"] == "perplexity":
        return f"{t['value']:.1f} [{t['lo']:.1f}, {t['hi']:.1f}]"
    return f"{100 * t['value']:.1f}% [{100 * t['lo']:.1f}, {100 * t['hi']:.1f}]"


def table(teacher: dict[str, Any], students: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: a row per model (the teacher first), per task the score [95% CI] and the retention."""
    key = (teacher["dataset"].get("content_sha256"), teacher["dataset"].get("limit"))
    for name, s in students:
        if (s["dataset"].get("content_sha256"), s["dataset"].get("limit")) != key:
            raise OmniedgeError(
                f"{name} was evaluated on other test examples than the teacher (dataset or --limit differs)",
                "evaluate every model with the same suite and --limit",
            )
    tasks = [t for t in TASKS if t in teacher["tasks"]]
    head = "| model | " + " | ".join(f"{TASKS[t]} | ret." for t in tasks) + " |"
    rows = [head, "|---|" + "---|---|" * len(tasks)]
    rows.append("| teacher | " + " | ".join(f"{_score(teacher['tasks'][t])} | 100%" for t in tasks) + " |")
    for name, s in students:
        cells = []
        for t in tasks:
            a, b = teacher["tasks"][t], s["tasks"].get(t)
            if b is None:
                cells.append("- | -")
                continue
            r = retention(a["value"], b["value"], a["lower_is_better"])
            cells.append(f"{_score(b)} | {100 * r:.1f}%")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        teacher = read_result(args[0])
        students = []
        for a in args[1:]:
            name, _, path = a.rpartition("=") if "=" in a else (Path(a).stem, "", a)
            students.append((name, read_result(path)))
        print(table(teacher, students))
    except OmniedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
