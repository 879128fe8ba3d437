"""The distilled student written back as a checkpoint (docs/artifacts.md §1), float or INT4.

Float: `omniedge.checkpoint.save_checkpoint`, the format `omniedge compress` reads and `export`/`eval`
take. INT4: the float weights are written first (float32, so nothing is rounded twice), then the
compress stage itself quantizes them with a recipe holding only its `quantize` stage: the same
quantizer, the same packed INT4 files and config entry, written by the same writer, as any compressed
checkpoint. The quantize settings come from --int4-recipe, else the student's own recipe (its
omniedge.json), else the default recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_json
from omniedge.checkpoint import META_FILE, read_meta
from omniedge.distill.pair import Loaded
from omniedge.errors import OmniedgeError


def resolve_int4(requested: str, student: Loaded) -> str:
    """auto -> `after` for an INT4 student (the output stays INT4), else `none`."""
    if requested != "auto":
        return requested
    return "after" if student.quantization else "none"


def quantize_recipe(student: Loaded, recipe_path: Path | None) -> dict[str, Any]:
    """A validated compress recipe whose only stage is the quantize stage to finish with."""
    from omniedge.compress.recipe import default_recipe, load_recipe, validate_recipe

    if recipe_path is not None:
        base, where = load_recipe(recipe_path), str(recipe_path)
    elif any("quantize" in st for st in (student.meta.get("recipe") or {}).get("stages", [])):
        base, where = student.meta["recipe"], f"{student.path}/{META_FILE}"
    else:
        base, where = default_recipe(), "the default recipe"
    stages = [st for st in base.get("stages", []) if "quantize" in st]
    if not stages:
        raise OmniedgeError(
            f"{where} has no quantize stage to finish the distilled student with",
            "pass --int4-recipe with a `quantize` stage, or --int4 none",
        )
    keep = {k: base[k] for k in ("calibration", "measure", "output", "dtype", "device") if k in base}
    return validate_recipe({"stages": stages, **keep})


def quantize_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    return next(st["quantize"] for st in recipe["stages"] if "quantize" in st)


def save_float(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any], dtype: Any) -> Path:
    from omniedge.checkpoint import save_checkpoint

    model.to("cpu")
    model.to(dtype)
    return save_checkpoint(model, tokenizer, path, meta=meta)


def write_outputs(
    model: Any,
    tokenizer: Any,
    out: Path,
    *,
    int4: str,
    recipe: dict[str, Any] | None,
    meta: dict[str, Any],
    float_dtype: Any,
    scratch: Path,
    float_out: Path | None,
    progress: bool = True,
) -> Path:
    """Write OUT (float when int4 == "none", else INT4 through the compress stage); returns OUT."""
    import torch

    if int4 == "none":
        if float_out is not None:
            save_float(model, tokenizer, float_out, meta, float_dtype)
        return save_float(model, tokenizer, out, meta, float_dtype)
    from omniedge.compress.pipeline import compress

    assert recipe is not None
    fdir = float_out if float_out is not None else scratch / "float"
    save_float(model, tokenizer, fdir, meta, torch.float32)
    compress(fdir, out, recipe, progress=progress)
    final = read_meta(out)
    final.update(
        made_by="omniedge distill (then the compress stage's quantizer)",
        distill=meta["distill"],
        distilled_from={
            "float_checkpoint": str(fdir) if float_out is not None else None,
            "kept": float_out is not None,
        },
    )
    if meta.get("preprocess"):
        final["preprocess"] = meta["preprocess"]
    atomic_write_json(out / META_FILE, final)  # omniedge.json is not among the hashed files
    return out
