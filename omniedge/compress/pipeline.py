"""The one entry point of the compression stage: checkpoint + recipe -> compressed checkpoint.

Loads the teacher, calibrates (cached under $OMNIEDGE_HOME, so a re-run after a crash skips it), applies
the recipe's stages in order, measures quality after each against the teacher, and saves atomically:
the output directory appears only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_bytes
from omniedge.checkpoint import META_FILE, file_sha256, load_checkpoint, read_meta, save_checkpoint
from omniedge.compress import calibration_data  # noqa: F401  (registers the data-set sources)
from omniedge.compress.calibration import RouterStats, calibrate, heldout_texts
from omniedge.compress.measure import Reference, compare, reference
from omniedge.compress.prune import keep_count, prune
from omniedge.compress.quantize import INT4_FILE, int4_bytes, quantize_model, write_int4
from omniedge.compress.recipe import apply_overrides, load_recipe, validate_recipe
from omniedge.errors import OmniedgeError
from omniedge.models.family import moe_blocks, thinker_parts
from omniedge.models.registry import resolve_checkpoint
from omniedge.outputs import CHECKPOINT, check_replaceable

CACHE_DIR = "calibration"  # under $OMNIEDGE_HOME, never beside the user's output
CACHE_VERSION = 1


def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise OmniedgeError(f"the output {out} is the input checkpoint", "write to a new directory with -o")
    check_replaceable(out, CHECKPOINT)


def _hash_dir(src: Path, progress: bool) -> dict[str, str]:
    """Content hashes of the input: from its omniedge.json when it has them, else computed (big files: slow)."""
    files = read_meta(src).get("files")
    if isinstance(files, dict) and files:
        return dict(files)
    from tqdm.auto import tqdm

    paths = [f for f in sorted(src.iterdir()) if f.is_file() and f.name != META_FILE]
    return {
        f.name: file_sha256(f) for f in tqdm(paths, desc="hashing input", unit="file", disable=not progress)
    }


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise OmniedgeError(f"recipe device {name!r} is not a torch device", "use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OmniedgeError(
            "recipe asks for device cuda but no CUDA GPU is visible", "use device: auto or cpu"
        )
    return dev


def calibration_cache_path(hashes: dict[str, str], recipe: dict[str, Any]) -> Path:
    """Where the router statistics for (input checkpoint, calibration settings, dtype) are cached."""
    key = json.dumps(
        {
            "v": CACHE_VERSION,
            "checkpoint": hashes,
            "calibration": recipe["calibration"],
            "dtype": recipe["dtype"],
        },
        sort_keys=True,
    )
    from omniedge.paths import home

    return home() / CACHE_DIR / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def _calibrate_cached(
    net: Any, tok: Any, recipe: dict[str, Any], cache: Path, progress: bool
) -> tuple[RouterStats, dict[str, Any]]:
    import torch

    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            return RouterStats.from_dict(d["stats"]), {**d["description"], "cached": True}
        except Exception:  # a damaged cache is recomputed, never trusted
            cache.unlink(missing_ok=True)
    t0 = time.perf_counter()
    stats, desc = calibrate(net, tok, recipe["calibration"], progress=progress)
    desc["seconds"] = round(time.perf_counter() - t0, 3)
    buf = io.BytesIO()
    torch.save({"stats": stats.to_dict(), "description": desc}, buf)
    atomic_write_bytes(cache, buf.getvalue())
    return stats, {**desc, "cached": False}


def _check_config(net: Any, expect_experts: int) -> None:
    """The config must survive a to_dict/from_dict round trip (what from_pretrained does) with our edits."""
    cfg = type(net.config).from_dict(net.config.to_dict())
    got = cfg.thinker_config.text_config.num_experts
    if got != expect_experts:
        raise RuntimeError(f"config round trip gives num_experts {got}, expected {expect_experts}")
    if hasattr(net.config, "omniedge_quantization") and not hasattr(cfg, "omniedge_quantization"):
        raise RuntimeError("config round trip lost omniedge_quantization")


def _settings(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s[stage] for s in recipe["stages"] if stage in s)


def _run_stage(
    name: str,
    settings: dict[str, Any],
    net: Any,
    stats: RouterStats | None,
    progress: bool,
    int4_out: dict[str, Any],
) -> dict[str, Any]:
    if name == "prune":
        assert stats is not None
        return prune(net, stats, settings)
    if name == "quantize":
        q = quantize_model(net, settings, progress=progress)
        int4_out.update(tensors=q["tensors"], group_size=int(settings["group_size"]))
        return {"modules": len(q["modules"]), "int4_bytes": int4_bytes(q["tensors"])}
    raise OmniedgeError(f"unknown stage {name!r}", "use prune or quantize")  # validate_recipe prevents this


def compress(model: str | Path, out: Path, recipe: dict[str, Any], progress: bool = True) -> Path:
    """Compress checkpoint `model` (a directory or `tiny`) into `out` as `recipe` says; returns `out`."""
    import torch

    recipe = validate_recipe(recipe)
    src = resolve_checkpoint(model)
    out = Path(out)
    _check_out(src, out)
    hashes = _hash_dir(src, progress)
    net, tok = load_checkpoint(src, dtype=getattr(torch, recipe["dtype"]))
    net.to(_device(recipe["device"]))
    if not moe_blocks(net):
        raise OmniedgeError(f"{src} has no thinker MoE layers", "pass a Qwen3-Omni MoE checkpoint")

    names = [next(iter(s)) for s in recipe["stages"]]
    stats, calib = None, None
    if "prune" in names:  # refuse an impossible keep_ratio before the long calibration
        tcfg = thinker_parts(net).text_model.config
        keep_count(
            int(tcfg.num_experts), int(tcfg.num_experts_per_tok), _settings(recipe, "prune")["keep_ratio"]
        )
        cache = calibration_cache_path(hashes, recipe)
        stats, calib = _calibrate_cached(net, tok, recipe, cache, progress)
        calib = {**calib, "cache": str(cache)}
    m = recipe["measure"]
    ref: Reference = reference(net, tok, heldout_texts(m["texts"]), m["max_tokens"], progress)

    records: list[dict[str, Any]] = []
    int4_out: dict[str, Any] = {}
    for st in recipe["stages"]:
        ((name, settings),) = st.items()
        t0 = time.perf_counter()
        result = _run_stage(name, settings, net, stats, progress, int4_out)
        seconds = time.perf_counter() - t0
        rec = {"name": name, "settings": settings, "seconds": round(seconds, 3)}
        if name == "prune" and calib is not None:  # the full description is at the top level
            rec["calibration"] = {k: calib[k] for k in ("source", "seed", "requests", "tokens", "cached")}
        rec.update(measured=compare(net, ref, progress), result=result)
        records.append(rec)

    _check_config(net, int(thinker_parts(net).text_model.config.num_experts))
    meta = {
        "model": read_meta(src).get("model") or src.name,
        "source": {"path": str(src.resolve()), "files": hashes},
        "recipe": recipe,
        "calibration": calib,
        "teacher": {
            "ppl": ref.teacher_ppl,
            "heldout_texts": len(ref.ids),
            "tokens": sum(x.shape[1] for x in ref.ids),
        },
        "stages": records,
    }
    extra = {}
    if int4_out:
        extra[INT4_FILE] = lambda d: write_int4(int4_out["tensors"], d, int4_out["group_size"])
    net.to("cpu")
    save_checkpoint(net, tok, out, meta, extra_files=extra)
    if progress:
        print_summary(meta, out)
    return out


def print_summary(meta: dict[str, Any], out: Path) -> None:
    """A short rich table: one row for the teacher, one per stage."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"omniedge compress -> {out}")
    for col in ("stage", "seconds", "experts", "int4 MB", "KL vs teacher", "top-1", "ppl"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    t.add_row("teacher", "", "", "", "0", "1.000", f"{meta['teacher']['ppl']:.3f}")
    for r in meta["stages"]:
        res, mes = r["result"], r["measured"]
        t.add_row(
            r["name"],
            f"{r['seconds']:.1f}",
            f"{res['experts_before']} -> {res['experts_after']}" if "experts_after" in res else "",
            f"{res['int4_bytes'] / 2**20:.2f}" if "int4_bytes" in res else "",
            f"{mes['kl']:.4g}",
            f"{mes['top1']:.3f}",
            f"{mes['ppl']:.3f}",
        )
    console = Console()
    console.print(t)
    calib = meta.get("calibration")
    if calib:
        how = "cached" if calib.get("cached") else f"{calib.get('seconds', 0):.1f} s"
        console.print(f"calibration: {calib['requests']} requests, tokens {calib['tokens']} ({how})")


def compress_cli(
    model: str, out: Path, recipe_path: Path | None, keep_ratio: float | None, quantize: bool
) -> Path:
    """`omniedge compress`: the recipe file (default recipes/default.yaml) with the CLI's overrides."""
    recipe = apply_overrides(load_recipe(recipe_path), keep_ratio=keep_ratio, quantize=quantize)
    return compress(model, Path(out), recipe)
