"""A distillation killed mid-way and restarted, against the same run uninterrupted (issue 11's resume check).

`python -m omniedge.bench.distill_resume TEACHER STUDENT --json OUT -- DISTILL_ARGS...` runs
`omniedge distill TEACHER STUDENT DISTILL_ARGS` three times in child processes: straight through; again, killed
with SIGKILL once its checkpoint has reached `--kill-after` steps; the same command again, which resumes. It
records where the kill landed, the largest weight difference between the straight and the resumed outputs, and
both loss curves. DISTILL_ARGS must fix the length of the run with `--steps` (a time budget ends wherever the
clock says) and include `--save-every`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _distill(teacher: str, student: str, out: Path, run: Path, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "omniedge",
        "distill",
        teacher,
        student,
        "-o",
        str(out),
        "--run-dir",
        str(run),
        *args,
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher")
    p.add_argument("student")
    p.add_argument("--work", type=Path, required=True, help="a new directory for the three runs")
    p.add_argument(
        "--kill-after", type=int, required=True, help="kill once the checkpoint holds this many steps"
    )
    p.add_argument("--json", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    args = argv[cut + 1 :]
    if "--steps" not in args or "--save-every" not in args:
        p.error("pass --steps and --save-every after --")
    a.work.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    w = a.work
    t0 = time.perf_counter()
    subprocess.run(_distill(a.teacher, a.student, w / "straight", w / "run-a", args), check=True, env=env)
    straight_s = time.perf_counter() - t0
    run = w / "run-b"
    state = run / "checkpoint" / "state.json"
    proc = subprocess.Popen(_distill(a.teacher, a.student, w / "resumed", run, args), env=env)
    while not (state.is_file() and json.loads(state.read_text())["step"] >= a.kill_after):
        if proc.poll() is not None:
            sys.exit("the run ended before it could be killed: lower --kill-after")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    subprocess.run(_distill(a.teacher, a.student, w / "resumed", run, args), check=True, env=env)

    from safetensors.torch import load_file

    sa, sb = load_file(w / "straight" / "model.safetensors"), load_file(w / "resumed" / "model.safetensors")
    diff = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    scale = max(float(sa[k].float().abs().max()) for k in sa)
    da = json.loads((w / "straight" / "omniedge.json").read_text())["distill"]
    db = json.loads((w / "resumed" / "omniedge.json").read_text())["distill"]
    r: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "killed_with_checkpoint_at_step": killed_at,
        "straight_seconds": round(straight_s, 1),
        "resumed_flag": db["run"].get("resumed"),
        "max_abs_weight_difference": diff,
        "max_abs_weight": scale,
        "loss_curves_equal_to_5_decimals": [round(c["loss"], 5) for c in da["curve"]]
        == [round(c["loss"], 5) for c in db["curve"]],
        "straight_curve": da["curve"],
        "resumed_curve": db["curve"],
        "evals_after": {"straight": da["evals"].get("after"), "resumed": db["evals"].get("after")},
    }
    from omniedge.atomic import atomic_write_json

    atomic_write_json(a.json, r)
    print(
        json.dumps({k: v for k, v in r.items() if not k.endswith("curve") and k != "evals_after"}, indent=1)
    )


if __name__ == "__main__":
    main()
