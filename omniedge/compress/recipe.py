"""Compression recipes: a list of small stages plus calibration settings, read from YAML or JSON.

As in llm-compressor, the recipe file alone reproduces a result: `validate_recipe` fills every default,
so the normalised recipe written into omniedge.json says exactly what ran.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omniedge.errors import OmniedgeError
from omniedge.models.family import REQUEST_KINDS

DEFAULT_RECIPE_PATH = Path(__file__).resolve().parents[2] / "recipes" / "default.yaml"

# The default recipe, also used when recipes/default.yaml is not shipped (a wheel install);
# tests check that the YAML file and this dict agree.
DEFAULT_RECIPE: dict[str, Any] = {
    "stages": [
        {"prune": {"method": "reap", "keep_ratio": 0.75, "weighting": "token"}},
        {"quantize": {"method": "rtn", "bits": 4, "group_size": 128, "targets": ["attention", "experts"]}},
    ],
    "calibration": {"source": "pack", "samples": 128, "max_tokens": 256, "seed": 0, "image_size": 128},
}

CALIBRATION_DEFAULTS: dict[str, Any] = {
    "source": "builtin",
    "path": None,  # a calibration pack directory (source: pack; relative to the recipe file); None: the shipped one
    "samples": 32,
    "max_tokens": 256,
    "seed": 0,
    # shares of the calibration requests per kind (REQUEST_KINDS; image+audio: a spoken question about an image)
    "mix": {"text": 0.5, "image": 0.25, "audio": 0.25, "image+audio": 0.0},
    "image_size": 128,
    "audio_seconds": 3.0,
}
# Held-out requests (never calibrated on) per modality, scored after every stage.
MEASURE_DEFAULTS: dict[str, Any] = {"texts": 8, "images": 4, "audios": 4, "max_tokens": 128}
# text_only: talker and code2wav are dropped (recorded in config.json and omniedge.json); shard_mb: the
# largest safetensors file written.
OUTPUT_DEFAULTS: dict[str, Any] = {"text_only": True, "shard_mb": 2048}
TOP_DEFAULTS: dict[str, Any] = {"dtype": "float32", "device": "auto"}


def recipe_error(where: str, problem: str, fix: str) -> OmniedgeError:
    return OmniedgeError(f"recipe {where}: {problem}", fix)


def check_keys(d: Any, allowed: Mapping[str, Any] | tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise recipe_error(
            where, f"expected a mapping, got {type(d).__name__} {d!r}", "write `key: value` pairs"
        )
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise recipe_error(where, f"unknown field(s) {unknown}", f"use only {sorted(allowed)}")
    return d


def as_int(v: Any, where: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise recipe_error(where, f"{v!r} is not an integer >= {lo}", f"give an integer >= {lo}")
    return v


def as_float(v: Any, where: str, lo: float, hi: float, lo_open: bool = True) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise recipe_error(
            where, f"{v!r} is outside {bracket}{lo}, {hi}]", f"give a number in {bracket}{lo}, {hi}]"
        )
    return float(v)


def as_bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise recipe_error(where, f"{v!r} is not true or false", "write true or false")
    return v


def as_choice(v: Any, where: str, choices: Any) -> Any:
    if v not in choices:
        raise recipe_error(where, f"{v!r} is not supported", f"use one of {sorted(choices)}")
    return v


DTYPES = ("float32", "bfloat16", "float16")


def stage_types() -> dict[str, Any]:
    """{recipe stage name: Stage class}; each class's `settings_type.parse` validates its settings."""
    from omniedge.compress.prune import PruneStage
    from omniedge.compress.quantize import QuantizeStage
    from omniedge.compress.reconstruct import ReconstructStage

    return {"prune": PruneStage, "reconstruct": ReconstructStage, "quantize": QuantizeStage}


def _calibration(c: Any) -> dict[str, Any]:
    where = "calibration"
    out = {**CALIBRATION_DEFAULTS, **check_keys(c or {}, CALIBRATION_DEFAULTS, where)}
    if not isinstance(out["source"], str) or not out["source"]:
        raise recipe_error(f"{where}.source", f"{out['source']!r} is not a source name", "use `builtin`")
    if out["path"] is not None and (not isinstance(out["path"], str) or not out["path"]):
        raise recipe_error(
            f"{where}.path", f"{out['path']!r} is not a path", "give the calibration pack directory"
        )
    out["samples"] = as_int(out["samples"], f"{where}.samples")
    out["max_tokens"] = as_int(out["max_tokens"], f"{where}.max_tokens", lo=8)
    out["seed"] = as_int(out["seed"], f"{where}.seed", lo=0)
    mix = check_keys(out["mix"], REQUEST_KINDS, f"{where}.mix")
    mix = {m: as_float(mix.get(m, 0.0), f"{where}.mix.{m}", 0.0, 1.0, lo_open=False) for m in REQUEST_KINDS}
    if sum(mix.values()) <= 0:
        raise recipe_error(f"{where}.mix", "all shares are zero", "give text, image or audio a share > 0")
    out["mix"] = mix
    size = as_int(out["image_size"], f"{where}.image_size", lo=32)
    if size % 32:
        raise recipe_error(
            f"{where}.image_size", f"{size} is not a multiple of 32 (patch 16 x merge 2)", "use 128"
        )
    out["image_size"] = size
    out["audio_seconds"] = as_float(out["audio_seconds"], f"{where}.audio_seconds", 0.0, 30.0)
    return out


def _measure(m: Any) -> dict[str, Any]:
    out = {**MEASURE_DEFAULTS, **check_keys(m or {}, MEASURE_DEFAULTS, "measure")}
    for k in ("texts", "images", "audios"):
        out[k] = as_int(out[k], f"measure.{k}", lo=0)
    if out["texts"] + out["images"] + out["audios"] == 0:
        raise recipe_error("measure", "no held-out requests", "give measure.texts (images, audios) > 0")
    out["max_tokens"] = as_int(out["max_tokens"], "measure.max_tokens", lo=2)
    return out


def _output(o: Any) -> dict[str, Any]:
    out = {**OUTPUT_DEFAULTS, **check_keys(o or {}, OUTPUT_DEFAULTS, "output")}
    if out["text_only"] is not True:
        raise recipe_error(
            "output.text_only",
            "carrying the talker and code2wav (speech output) through compression is not supported yet",
            "set output.text_only: true (they are dropped and the checkpoint says so)",
        )
    out["shard_mb"] = as_int(out["shard_mb"], "output.shard_mb")
    return out


def validate_recipe(raw: Any) -> dict[str, Any]:
    """The recipe with every field checked and every default filled in; OmniedgeError on the first mistake."""
    top = check_keys(raw, ("stages", "calibration", "measure", "output", *TOP_DEFAULTS), "top level")
    stages_in = top.get("stages", [])
    if not isinstance(stages_in, list):
        raise recipe_error(
            "stages", f"expected a list, got {stages_in!r}", "write `stages: [- prune: {...}, ...]`"
        )
    stages: list[dict[str, Any]] = []
    for i, st in enumerate(stages_in):
        if not isinstance(st, dict) or len(st) != 1:
            raise recipe_error(
                f"stages[{i}]", f"{st!r} is not a one-key mapping", "write `- prune: {keep_ratio: 0.5}`"
            )
        ((name, settings),) = st.items()
        types = stage_types()
        if name not in types and name != "distill":
            raise recipe_error(
                f"stages[{i}]", f"unknown stage {name!r}", f"known stages: {[*types, 'distill']}"
            )
        if any(name in s for s in stages):
            raise recipe_error(f"stages[{i}]", f"stage {name!r} appears twice", "keep one")
        if name == "distill":  # a pass over the whole student, not a per-layer stage
            from omniedge.distill.recipe_stage import parse_stage

            stages.append({name: parse_stage(settings, f"stages[{i}].{name}")})
            continue
        parsed = types[name].settings_type.parse(settings or {}, f"stages[{i}].{name}")
        stages.append({name: parsed.as_dict()})
    names = [next(iter(s)) for s in stages]
    if "quantize" in names and names[-1] != "quantize":
        raise recipe_error(
            "stages",
            f"quantize must be the last stage (got order {names})",
            "prune before quantizing: int4.safetensors must describe the final weights",
        )
    if "reconstruct" in names and "prune" in names and names.index("reconstruct") < names.index("prune"):
        raise recipe_error(
            "stages",
            f"reconstruct must come after prune (got order {names})",
            "put reconstruct after prune: it re-fits the experts that pruning kept",
        )
    if "distill" in names:
        from omniedge.distill.recipe_stage import check_order

        check_order(stages)
    out = {
        "stages": stages,
        "calibration": _calibration(top.get("calibration")),
        "measure": _measure(top.get("measure")),
        "output": _output(top.get("output")),
    }
    out["dtype"] = as_choice(top.get("dtype", TOP_DEFAULTS["dtype"]), "dtype", DTYPES)
    out["device"] = top.get("device", TOP_DEFAULTS["device"])
    if not isinstance(out["device"], str) or not out["device"]:
        raise recipe_error("device", f"{out['device']!r} is not a device name", "use auto, cpu or cuda")
    return out


def read_recipe_file(path: str | Path) -> Any:
    """Parse a YAML (.yaml/.yml) or JSON recipe file, without validating it."""
    p = Path(path)
    if not p.is_file():
        raise OmniedgeError(
            f"recipe file not found: {p}", f"pass an existing file, e.g. {DEFAULT_RECIPE_PATH}"
        )
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise OmniedgeError(f"recipe {p} is not valid JSON: {e}", "fix the syntax") from e
    try:
        import yaml
    except ImportError as e:
        raise OmniedgeError("reading a YAML recipe needs PyYAML", "pip install pyyaml, or use JSON") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OmniedgeError(f"recipe {p} is not valid YAML: {e}", "fix the syntax") from e


def default_recipe() -> dict[str, Any]:
    """recipes/default.yaml when it is there (a source checkout), else the same recipe built in."""
    raw = read_recipe_file(DEFAULT_RECIPE_PATH) if DEFAULT_RECIPE_PATH.is_file() else DEFAULT_RECIPE
    return validate_recipe(copy.deepcopy(raw))


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """The validated recipe from a file, or the default recipe when `path` is None. A relative
    calibration.path is taken relative to the recipe file's directory."""
    if path is None:
        return default_recipe()
    raw = read_recipe_file(path)
    cal = raw.get("calibration") if isinstance(raw, dict) else None
    if isinstance(cal, dict) and isinstance(cal.get("path"), str) and cal["path"]:
        cal["path"] = str((Path(path).resolve().parent / cal["path"]).resolve())
    stages = raw.get("stages") if isinstance(raw, dict) else None
    for st in stages if isinstance(stages, list) else []:
        if isinstance(st, dict) and isinstance(st.get("distill"), dict):
            from omniedge.distill.recipe_stage import resolve_paths

            resolve_paths(st["distill"], Path(path).resolve().parent)
    return validate_recipe(raw)


def apply_overrides(
    recipe: dict[str, Any], keep_ratio: float | None = None, quantize: bool = True, samples: int | None = None
) -> dict[str, Any]:
    """CLI overrides: --keep-ratio sets (or adds) the prune stage, --no-quantize drops the quantize stage,
    --samples sets calibration.samples."""
    out = copy.deepcopy(recipe)
    if samples is not None:
        out["calibration"]["samples"] = samples
    stages = out.get("stages", [])
    if keep_ratio is not None:
        prune = [s for s in stages if "prune" in s]
        if prune:
            prune[0]["prune"]["keep_ratio"] = keep_ratio
        else:
            stages.insert(0, {"prune": {"method": "frequency", "keep_ratio": keep_ratio}})
    if not quantize:
        stages = [s for s in stages if "quantize" not in s]
    out["stages"] = stages
    return validate_recipe(out)
