"""The `distill` stage of `omniedge compress` recipes: `prune -> distill -> quantize` in three passes.

Distillation needs the whole student model, so it is not a per-layer stage: a recipe with a distill stage
runs (1) `compress` with the stages before it into a float student, (2) `distill()` from the compress
source (the teacher) into that student on the stage's `data`, (3) `compress` with the stages after it.
With `int4: qat` the student trains through fake INT4 weights of the recipe's `rtn` quantize stage and
`distill()` writes the INT4 checkpoint itself (through the same quantizer), so pass 3 is not needed.

Every pass writes into a work directory next to the output, `.OUT.distill-work/` (student/, run/,
distilled/, final/): a re-run of the same command keeps a finished student or distilled checkpoint and
resumes the training from run/; the output is renamed into place at the end and the work directory
removed. Its omniedge.json records the recipe as written (defaults filled), every stage in order, and
`distill()`'s record.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.checkpoint import META_FILE, read_meta
from omniedge.distill.settings import DistillSettings
from omniedge.errors import OmniedgeError
from omniedge.outputs import CHECKPOINT, OutputKind, check_replaceable

STAGE = "distill"
# The stage's own fields; every other field is a DistillSettings field (omniedge/distill/settings.py).
STAGE_FIELDS = ("data", "teacher_cache")
WORK_DIR = OutputKind(
    "compress work directory", "work.json", "omniedge compress (a recipe with a distill stage)"
)


def parse_stage(raw: Any, where: str) -> dict[str, Any]:
    """The distill stage's settings, checked and with every default filled; one OmniedgeError per mistake."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OmniedgeError(f"recipe {where}: expected a mapping, got {raw!r}", "write `key: value` pairs")
    data = raw.get("data")
    if not isinstance(data, str) or not data:
        raise OmniedgeError(
            f"recipe {where}.data: {'missing' if data is None else repr(data) + ' is not a name or path'}",
            "give the training data: `omni-mini` / `omni-mini-small`, a dataset directory or a training pack",
        )
    known = sorted({f.name for f in fields(DistillSettings)} | set(STAGE_FIELDS))
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise OmniedgeError(f"recipe {where}: unknown field(s) {unknown}", f"use only {known}")
    cache = raw.get("teacher_cache")
    if cache is not None and (not isinstance(cache, str) or not cache):
        raise OmniedgeError(f"recipe {where}.teacher_cache: {cache!r} is not a path", "give a directory")
    try:
        settings = DistillSettings.from_mapping(
            {k: v for k, v in raw.items() if k not in STAGE_FIELDS}, f"recipe {where}"
        )
    except TypeError as e:  # a field of the wrong kind the dataclass could not even take
        raise OmniedgeError(f"recipe {where}: {e}", "check the field's type") from e
    except OmniedgeError as e:
        msg = e.problem if e.problem.startswith("recipe ") else f"recipe {where}: {e.problem}"
        raise OmniedgeError(msg, e.fix) from e
    if settings.int4 not in ("auto", "none", "qat"):
        raise OmniedgeError(
            f"recipe {where}.int4: {settings.int4!r} does not apply in a recipe (the quantize stage after "
            "distill is what quantizes)",
            "use int4: none (distil the float student), or qat (train through the quantize stage's INT4)",
        )
    settings.int4 = "none" if settings.int4 == "auto" else settings.int4  # the student of pass 1 is float
    return {"data": data, "teacher_cache": cache, **settings.to_dict()}


def check_order(stages: list[dict[str, Any]]) -> None:
    """Distill comes after prune; `int4: qat` needs an `rtn` quantize stage after it."""
    names = [next(iter(s)) for s in stages]
    if STAGE not in names:
        return
    i = names.index(STAGE)
    if "prune" in names[i:]:
        raise OmniedgeError(
            f"recipe stages: distill must come after prune (got order {names})",
            "prune first: the pruned model is the student that distillation trains",
        )
    if stages[i][STAGE]["int4"] == "qat":
        quant = [s["quantize"] for s in stages[i + 1 :] if "quantize" in s]
        if not quant or quant[0]["method"] != "rtn":
            raise OmniedgeError(
                f"recipe stages[{i}].distill.int4: qat trains through RTN INT4 weights, but "
                + (
                    "no quantize stage follows"
                    if not quant
                    else f"the quantize stage is {quant[0]['method']}"
                ),
                "add `- quantize: {method: rtn}` after distill, or use int4: none",
            )


def resolve_paths(stage: dict[str, Any], recipe_dir: Path) -> None:
    """A recipe file's relative `data` (when it names something there) and `teacher_cache` are taken
    relative to the recipe file's directory; suite names (`omni-mini`) stay as they are."""
    data = stage.get("data")
    if isinstance(data, str) and data and not Path(data).is_absolute() and (recipe_dir / data).exists():
        stage["data"] = str((recipe_dir / data).resolve())
    cache = stage.get("teacher_cache")
    if isinstance(cache, str) and cache and not Path(cache).is_absolute():
        stage["teacher_cache"] = str((recipe_dir / cache).resolve())


def has_stage(recipe: dict[str, Any]) -> bool:
    return any(STAGE in s for s in recipe.get("stages", []))


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.distill-work"


def _open_work(work: Path, key: dict[str, Any]) -> None:
    """The work directory of this output and recipe; one left by another recipe or source is emptied."""
    check_replaceable(work, WORK_DIR)
    marker = work / WORK_DIR.marker
    if marker.is_file() and json.loads(marker.read_text()) != key:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, key)


def _device(name: str) -> str:
    return "cpu" if name == "cpu" else "cuda" if name.startswith("cuda") else "auto"


def _stage_record(d_meta: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    rec = d_meta["distill"]
    return {
        "name": STAGE,
        "settings": settings,
        "seconds": rec["run"].get("seconds_total"),
        "measured": None,
        "result": {
            "steps": rec["run"]["steps"],
            "resumed": rec["run"]["resumed"],
            "retention": rec.get("retention"),
            "recovered_share": rec.get("recovered_share"),
        },
    }


def compress_with_distill(
    model: str | Path, out: Path, recipe: dict[str, Any], progress: bool = True
) -> Path:
    """`compress` for a validated recipe with a distill stage (the three passes above); returns `out`."""
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import validate_recipe
    from omniedge.distill.data import resolve_source
    from omniedge.distill.run import distill
    from omniedge.models.registry import resolve_checkpoint

    out = Path(out)
    teacher = resolve_checkpoint(model)  # the teacher is read whole: a checkpoint directory, not `full`
    if out.resolve() == teacher.resolve():
        raise OmniedgeError(f"the output {out} is the input checkpoint", "write to a new directory with -o")
    check_replaceable(out, CHECKPOINT)
    names = [next(iter(s)) for s in recipe["stages"]]
    i = names.index(STAGE)
    stage = recipe["stages"][i][STAGE]
    resolve_source(stage["data"])  # unknown data: one error now, not after pass 1
    settings = DistillSettings.from_mapping({k: v for k, v in stage.items() if k not in STAGE_FIELDS})
    rest = {k: recipe[k] for k in ("calibration", "measure", "output", "dtype", "device")}
    before = validate_recipe({"stages": recipe["stages"][:i], **rest})
    after = validate_recipe({"stages": recipe["stages"][i + 1 :], **rest})
    qat = settings.int4 == "qat"

    work = work_dir(out)
    _open_work(work, {"source": str(teacher.resolve()), "recipe": recipe})
    student, distilled, run_dir, final = (work / n for n in ("student", "distilled", "run", "final"))
    say = print if progress else (lambda *a, **k: None)

    if read_meta(student).get("recipe") == before:  # compress writes atomically: there means complete
        say(f"pass 1/3: the pruned student {student} is there from an earlier run")
    else:
        say(f"pass 1/3: compress {model} with {names[:i]} -> {student}")
        compress(teacher, student, before, progress=progress)

    if "distill" in read_meta(distilled) and not run_dir.exists():
        say(f"pass 2/3: the distilled student {distilled} is there from an earlier run")
    else:
        say(f"pass 2/3: distill {teacher} -> {student} on {stage['data']} (resumes from {run_dir})")
        int4_recipe = None
        if qat:
            int4_recipe = work / "quantize-recipe.json"
            atomic_write_json(int4_recipe, after)
        distill(str(teacher), str(student), distilled, stage["data"], settings, device=_device(recipe["device"]),
                teacher_cache=Path(stage["teacher_cache"]) if stage["teacher_cache"] else None,
                run_dir=run_dir, int4_recipe=int4_recipe, progress=progress)  # fmt: skip

    if after["stages"] and not qat:
        say(f"pass 3/3: compress {distilled} with {names[i + 1 :]}")
        compress(distilled, final, after, progress=progress)
    else:
        final = distilled
    s_meta, d_meta, meta = read_meta(student), read_meta(distilled), read_meta(final)
    meta.update(
        made_by="omniedge compress (a recipe with a distill stage, in three passes)",
        model=s_meta.get("model"),
        source=s_meta.get("source"),
        recipe=recipe,
        teacher=s_meta.get("teacher"),
        stages=[
            *s_meta.get("stages", []),
            _stage_record(d_meta, stage),
            *(r for r in meta.get("stages", []) if r["name"] in names[i + 1 :]),  # (a re-run: not twice)
        ],
        distill=d_meta["distill"],
        passes={"student": s_meta.get("run"), "final": meta.get("run")},
    )
    meta.pop("distilled_from", None)
    atomic_write_json(final / META_FILE, meta)  # omniedge.json is not among the hashed files
    with atomic_dir(out, CHECKPOINT) as tmp:
        tmp.rmdir()
        final.rename(tmp)
    shutil.rmtree(work)
    say(f"wrote {out}")
    return out
