"""Retention sweep on omni-mini (issue 10): compress with each variant, score with `omniedge eval`, tabulate.

    python -m omniedge.bench.retention_sweep WORK p50-reap-uniform p50-frequency-global q-gptq ...

A variant name says its recipe: `p<removed%>-<saliency>-<budget>[-<weighting>]` prunes only
(saliency: random, frequency, router_mass, reap, contribution; budget: uniform or global; weighting:
token (default here) or modality); `q-<method>` quantizes only (rtn, rtn_clip, gptq, awq; INT4, group 128,
attention + experts); `p<..>+q-<method>` does both, in that order. Every variant calibrates on omni-mini's
own training data (128 requests, 256 tokens, seed 0, the omni-mini recipe's calibration).

For each variant the sweep runs `omniedge compress omni-mini -o WORK/ckpt/NAME --recipe WORK/recipes/NAME.yaml`
and `omniedge eval WORK/ckpt/NAME --json WORK/NAME.json [--limit N]` (the teacher: `omniedge eval omni-mini`
into WORK/teacher.json), skipping what is already there (resumable; each step writes atomically), and
prints `bench/retention.py`'s Markdown table of all of them with their compress time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from omniedge.bench.retention import read_result, table
from omniedge.errors import OmniedgeError

SALIENCIES = ("random", "frequency", "router_mass", "reap", "contribution")
QUANTIZERS = {
    "rtn": {"method": "rtn"},
    "rtn_clip": {"method": "rtn", "clip_search": True},
    "gptq": {"method": "gptq"},
    "awq": {"method": "awq"},
}
CALIBRATION = {"source": "omni-mini-data", "samples": 128, "max_tokens": 256, "seed": 0}


def _prune(part: str) -> dict[str, Any]:
    bits = part.split("-")
    if len(bits) not in (3, 4) or not bits[0][1:].isdigit() or bits[1] not in SALIENCIES:
        raise OmniedgeError(
            f"cannot read the prune variant {part!r}",
            "write p<removed%>-<saliency>-<uniform|global>[-<token|modality>], e.g. p50-reap-global",
        )
    removed = int(bits[0][1:])
    if bits[2] not in ("uniform", "global") or not 0 < removed < 100:
        raise OmniedgeError(
            f"cannot read the prune variant {part!r}", "budget uniform or global, 0 < removed < 100"
        )
    weighting = bits[3] if len(bits) == 4 else "token"
    return {
        "prune": {
            "method": bits[1],
            "keep_ratio": round(1 - removed / 100, 4),
            "budget": bits[2],
            "weighting": weighting,
        }
    }


def _quantize(part: str) -> dict[str, Any]:
    method = part.removeprefix("q-")
    if method not in QUANTIZERS:
        raise OmniedgeError(f"unknown quantizer variant {part!r}", f"use q-{' or q-'.join(QUANTIZERS)}")
    return {
        "quantize": {**QUANTIZERS[method], "bits": 4, "group_size": 128, "targets": ["attention", "experts"]}
    }


def recipe_of(name: str) -> dict[str, Any]:
    """The recipe a variant name stands for (module docstring)."""
    stages = [_quantize(p) if p.startswith("q-") else _prune(p) for p in name.split("+")]
    return {"stages": stages, "calibration": dict(CALIBRATION)}


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise OmniedgeError(f"`{' '.join(cmd)}` failed (exit {rc})", f"see {log}")
    return time.monotonic() - t0


def sweep(work: Path, names: list[str], limit: int | None) -> str:
    work.mkdir(parents=True, exist_ok=True)
    for d in ("recipes", "ckpt", "logs"):
        (work / d).mkdir(exist_ok=True)
    om = [sys.executable, "-m", "omniedge"]
    lim = ["--limit", str(limit)] if limit else []
    if not (work / "teacher.json").is_file():
        _run(
            [*om, "eval", "omni-mini", "--json", str(work / "teacher.json"), *lim],
            work / "logs/teacher.eval.log",
        )
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
    for name in names:
        rec = work / "recipes" / f"{name}.yaml"
        rec.write_text(yaml.safe_dump(recipe_of(name), sort_keys=False))
        ck = work / "ckpt" / name
        if not (ck / "omniedge.json").is_file():
            timings[name] = round(
                _run(
                    [*om, "compress", "omni-mini", "-o", str(ck), "--recipe", str(rec)],
                    work / f"logs/{name}.log",
                ),
                1,
            )
            (work / "timings.json").write_text(json.dumps(timings, indent=1))
        if not (work / f"{name}.json").is_file():
            _run(
                [*om, "eval", str(ck), "--json", str(work / f"{name}.json"), *lim],
                work / f"logs/{name}.eval.log",
            )
        print(f"done {name} ({time.strftime('%H:%M:%S')})", flush=True)
    teacher = read_result(work / "teacher.json")
    done = [n for n in names if (work / f"{n}.json").is_file()]
    return table(teacher, [(f"{n} ({timings.get(n, '?')} s)", read_result(work / f"{n}.json")) for n in done])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, help="directory for recipes, checkpoints, eval results and logs")
    p.add_argument("variants", nargs="+", help="variant names (see above)")
    p.add_argument("--limit", type=int, help="only the first N test examples of each task")
    a = p.parse_args(argv)
    try:
        for n in a.variants:
            recipe_of(n)  # every name checked before the long work
        print(sweep(a.work, a.variants, a.limit))
    except OmniedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
