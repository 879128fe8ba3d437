"""`omniedge export`: checkpoint -> engine bundle (manifest.json, tokenizer, embeddings, one ONNX per
modality), written into a temporary directory and renamed into place, so a crash leaves nothing half done.

The manifest (docs/artifacts.md §2) is the runtime's only source of truth: graph I/O is read back from the
saved ONNX files, preprocessing parameters from the checkpoint's config.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.checkpoint import check_checkpoint_dir, file_sha256, read_meta
from omniedge.errors import OmniedgeError
from omniedge.outputs import BUNDLE, check_replaceable

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COMPONENTS = ("vision", "audio", "thinker")
# Whisper front end of Qwen3-Omni's audio encoder (its processor is not buildable here: no torchvision).
AUDIO_FRONT_END = {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160}
AUDIO_MAX_SECONDS = 30
IMAGE_MEAN_STD = [0.5, 0.5, 0.5]
# Exporter dim names -> contract names (docs/artifacts.md §2).
DIM_NAMES = {"seq + past": "past + seq"}


def _versions() -> dict[str, Any]:
    import onnx
    import torch
    import transformers

    import omniedge
    from omniedge.export.onnx_io import OPSET

    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "omniedge": omniedge.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
        "onnxruntime": ort_version,
        "tensorrt": None,
        "gpu": None,
        "gpu_sm": None,
    }


def _special_tokens(tokenizer: Any) -> tuple[dict[str, int], list[int]]:
    from omniedge.models.tokenizer import special_ids

    try:
        special = special_ids(tokenizer)
    except ValueError as e:
        raise OmniedgeError(
            f"the checkpoint's tokenizer.json is not Qwen3-Omni's: {e}", "re-create the checkpoint"
        ) from e
    return special, [special["im_end"], special["endoftext"]]


def _text_section(parts: Any) -> dict[str, int]:
    cfg = parts.text_model.config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return {
        "hidden_size": int(cfg.hidden_size),
        "num_layers": len(parts.text_model.layers),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": head_dim,
        "vocab_size": int(parts.text_model.embed_tokens.weight.shape[0]),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "num_deepstack": len(parts.visual.config.deepstack_visual_indexes),
    }


def _preprocess(parts: Any, image_size: int) -> dict[str, Any]:
    from omniedge.export.audio import conv_tokens
    from omniedge.export.vision import grid_for

    v, a = parts.visual.config, parts.audio_tower.config
    grid = grid_for(image_size, v)
    merge = int(v.spatial_merge_size)
    n_window, n_window_infer = int(a.n_window), int(a.n_window_infer)
    chunk = 2 * n_window
    per_chunk = conv_tokens(chunk)
    return {
        "image": {
            "size": [image_size, image_size],
            "patch_size": int(v.patch_size),
            "temporal_patch_size": int(v.temporal_patch_size),
            "merge_size": merge,
            "mean": IMAGE_MEAN_STD,
            "std": IMAGE_MEAN_STD,
            "rescale_factor": 1 / 255,
            "resample": "bicubic",
            "grid_thw": list(grid),
            "num_tokens": grid[0] * grid[1] * grid[2] // merge**2,
        },
        "audio": {
            **AUDIO_FRONT_END,
            "n_mels": int(a.num_mel_bins),
            "n_window": n_window,
            "n_window_infer": n_window_infer,
            "max_seconds": AUDIO_MAX_SECONDS,
            "chunk_frames": chunk,
            "tokens_per_chunk": per_chunk,
            "tokens_per_window": per_chunk * (n_window_infer // chunk),
        },
        "position_id_per_seconds": int(getattr(parts.thinker.config, "position_id_per_seconds", 13)),
    }


def _write_embeddings(parts: Any, out: Path) -> dict[str, Any]:
    import numpy as np

    w = parts.text_model.embed_tokens.weight.detach().float().cpu().numpy()
    np.save(out / "embed_tokens.npy", w)
    return {"file": "embed_tokens.npy", "dtype": "float32", "shape": list(w.shape)}


def export_bundle(checkpoint: Path, out: Path, image_size: int | None = None) -> Path:
    """Export `checkpoint` (an HF directory, fp32) to the engine bundle `out`; returns `out`."""
    import torch
    from tqdm.auto import tqdm

    from omniedge.checkpoint import load_checkpoint
    from omniedge.export.audio import export_audio
    from omniedge.export.int4_graph import load_int4, module_names, translation_table, warn_unused
    from omniedge.export.onnx_io import check_graph, component_record, rename_dims
    from omniedge.export.thinker import export_thinker
    from omniedge.export.vision import check_image_size, default_image_size, export_vision
    from omniedge.models.family import thinker_parts

    checkpoint = check_checkpoint_dir(checkpoint)
    out = Path(out)
    if out.resolve() == checkpoint.resolve():
        raise OmniedgeError("the bundle directory is the checkpoint directory", "pass another -o/--out")
    check_replaceable(out, BUNDLE)  # before the model loads: refuse a folder that is not a bundle
    model, tokenizer = load_checkpoint(checkpoint, dtype=torch.float32)
    parts = thinker_parts(model)
    if parts.visual is None or parts.audio_tower is None:
        raise OmniedgeError(
            f"{checkpoint} has no vision or audio encoder", "export a full Qwen3-Omni thinker"
        )
    size = (
        check_image_size(image_size, parts.visual.config)
        if image_size
        else default_image_size(parts.visual.config)
    )
    store = load_int4(checkpoint, model)
    names = module_names(model)
    table = translation_table()
    special, eos = _special_tokens(tokenizer)
    meta = read_meta(checkpoint)

    with atomic_dir(out, BUNDLE) as tmp:
        shutil.copyfile(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
        embed = _write_embeddings(parts, tmp)
        jobs = {
            "vision": lambda p: export_vision(parts.visual, names, store, size, p, table),
            "audio": lambda p: export_audio(parts.audio_tower, names, store, p, table),
            "thinker": lambda p: export_thinker(
                parts.text_model,
                parts.lm_head,
                len(parts.visual.config.deepstack_visual_indexes),
                names,
                store,
                p,
                table,
            ),
        }
        components: dict[str, Any] = {}
        bar = tqdm(COMPONENTS, desc="export", unit="graph")
        for name in bar:
            bar.set_description(f"export {name}")
            path = tmp / f"{name}.onnx"
            jobs[name](path)
            rename_dims(path, DIM_NAMES)
            check_graph(path)
            components[name] = component_record(path, tmp)
            bar.write(f"  {name}.onnx  {components[name]['weight_bytes'] / 2**20:.1f} MiB of weights")
        float_fallback = warn_unused(store)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "name": str(meta.get("model") or checkpoint.name),
                "checkpoint": str(checkpoint.resolve()),
                "checkpoint_meta": meta,
                "quantization": _quantization(checkpoint, store, float_fallback),
            },
            "builder": _versions(),
            "tokenizer": "tokenizer.json",
            "special_tokens": special,
            "eos_token_ids": eos,
            "text": _text_section(parts),
            "embed_tokens": {**embed, "sha256": file_sha256(tmp / "embed_tokens.npy")},
            "preprocess": _preprocess(parts, size),
            "components": components,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return out


def _quantization(checkpoint: Path, store: Any, float_fallback: list[str]) -> dict[str, Any] | None:
    if store is None:
        return None
    cfg = json.loads((checkpoint / "config.json").read_text()).get("omniedge_quantization", {})
    return {
        **{k: v for k, v in cfg.items() if k != "modules"},
        "int4_tensors": len(store),
        "exported_as_float": float_fallback,
        "linear_op": "com.microsoft.MatMulNBits",
        "experts_op": "Gather of top-k packed experts + unpack (Cast, Floor, Mul, Sub)",
    }


def export_cli(checkpoint: str, out: Path, image_size: int | None) -> None:
    """What `omniedge export` runs: resolve a name like `tiny`, export, print where the bundle went."""
    from omniedge.models.registry import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    bundle = export_bundle(path, Path(out), image_size=image_size)
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
    print(f"bundle written: {bundle}  ({size / 2**20:.1f} MiB)")
