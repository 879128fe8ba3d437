"""`omniedge export`: checkpoint -> engine bundle (manifest.json, tokenizer, embeddings, one ONNX per
modality), written into a temporary directory and renamed into place, so a crash leaves nothing half done.

The manifest (docs/artifacts.md §2) is the runtime's only source of truth: graph I/O is read back from the
saved ONNX files, preprocessing parameters from the checkpoint's config.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.checkpoint import check_checkpoint_dir, file_sha256, read_meta
from omniedge.errors import OmniedgeError
from omniedge.export.thinker_spec import MOE_KERNELS, custom_ops_of
from omniedge.outputs import BUNDLE, check_replaceable

SCHEMA_VERSION = 2  # must equal omniedge.runtime.manifest.SCHEMA_VERSION
MANIFEST = "manifest.json"
COMPONENTS = ("vision", "audio", "thinker")
FLAVOURS = ("ort", "portable")
DEVICES = ("cpu", "cuda")
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


def _text_section(config: Any) -> dict[str, int]:
    cfg = config.thinker_config.text_config
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return {
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(cfg.num_key_value_heads),
        "head_dim": head_dim,
        "vocab_size": int(cfg.vocab_size),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "num_deepstack": len(config.thinker_config.vision_config.deepstack_visual_indexes),
    }


def _preprocess(config: Any, image_size: int) -> dict[str, Any]:
    from omniedge.export.audio import conv_tokens
    from omniedge.export.vision import grid_for

    v, a = config.thinker_config.vision_config, config.thinker_config.audio_config
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
        "position_id_per_seconds": int(getattr(config.thinker_config, "position_id_per_seconds", 13)),
    }


def _write_embeddings(source: Any, out: Path, dtype: str) -> dict[str, Any]:
    import numpy as np

    w = source.get("thinker.model.embed_tokens.weight").float().numpy().astype(dtype)
    np.save(out / "embed_tokens.npy", w)
    return {"file": "embed_tokens.npy", "dtype": dtype, "shape": list(w.shape)}


def _thinker_graph(flavour: str, dtype: str, config: Any, providers: list[str]) -> dict[str, Any]:
    from omniedge.export.rope_probe import rope_spec

    return {
        "flavour": flavour,
        "dtype": dtype,
        "rope": rope_spec(config.thinker_config.text_config),
        "providers": providers,
    }


def _export_portable_thinker(checkpoint: Path, path: Path, table: Any) -> list[str]:
    """The standard-ops thinker (TensorRT): built from the whole model in float32 through torch.onnx.export,
    so it is for models that fit in host memory; returns the INT4 tensors it exported as float."""
    import torch

    from omniedge.checkpoint import load_checkpoint
    from omniedge.export.int4_graph import CONFIG_KEY, check_portable, load_int4, module_names, warn_unused
    from omniedge.export.thinker import export_thinker
    from omniedge.models.family import thinker_parts
    from omniedge.weights import canonical_name

    check_portable(json.loads((checkpoint / "config.json").read_text()).get(CONFIG_KEY) or {}, checkpoint)
    model, _ = load_checkpoint(checkpoint, dtype=torch.float32, dequantize=True)
    parts = thinker_parts(model)
    shapes = {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    store = load_int4(checkpoint, shapes, prefix=("thinker.model.", "thinker.lm_head"))
    deepstack = len(parts.visual.config.deepstack_visual_indexes)
    export_thinker(parts.text_model, parts.lm_head, deepstack, module_names(model), store, path, table)
    return warn_unused(store)


def export_bundle(
    checkpoint: Path,
    out: Path,
    image_size: int | None = None,
    flavour: str = "ort",
    device: str = "cpu",
    fused_qk_norm: bool | None = None,
    progress: bool = True,
    moe_kernel: str = "qmoe",
) -> Path:
    """Export `checkpoint` (an HF directory) to the engine bundle `out`; returns `out`.

    `flavour` "ort": the thinker graph of ONNX Runtime contrib ops, streamed from the checkpoint's tensors
    (float16 for `device` "cuda", float32 for "cpu"); "portable": standard ONNX ops (for TensorRT).
    Encoders are float32 graphs either way. `fused_qk_norm` (ort flavour): GroupQueryAttention applies the
    q/k RMSNorm, which ONNX Runtime runs only on CUDA; None: fused for "cuda", separate for "cpu"."""
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from omniedge.export.audio import export_audio
    from omniedge.export.encoders import (
        AUDIO_PREFIX,
        VISION_PREFIX,
        load_encoders,
        module_names,
        param_shapes,
        read_config,
    )
    from omniedge.export.int4_graph import load_int4, translation_table, warn_unused
    from omniedge.export.onnx_io import check_graph, component_record, rename_dims
    from omniedge.export.thinker_ort import Options, export_thinker_ort
    from omniedge.export.vision import check_image_size, default_image_size, export_vision
    from omniedge.weights import SafetensorsDir

    if flavour not in FLAVOURS:
        raise OmniedgeError(f"unknown thinker flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    if device not in DEVICES:
        raise OmniedgeError(f"unknown export device {device!r}", f"use one of {', '.join(DEVICES)}")
    if moe_kernel not in MOE_KERNELS:
        raise OmniedgeError(f"unknown MoE kernel {moe_kernel!r}", f"use one of {', '.join(MOE_KERNELS)}")
    if moe_kernel != "qmoe" and flavour != "ort":
        raise OmniedgeError(
            f"--moe-kernel {moe_kernel} is an ort-flavour graph",
            "export with --flavour ort, or --moe-kernel qmoe",
        )
    if moe_kernel == "omniedge" and device != "cuda":
        warnings.warn(
            "--moe-kernel omniedge on the CPU runs its reference loop (exact, slow): use --moe-kernel qmoe for a CPU "
            "deployment",
            stacklevel=2,
        )
    if fused_qk_norm is None:
        fused_qk_norm = flavour == "ort" and device == "cuda"
    if fused_qk_norm and (device != "cuda" or flavour != "ort"):
        raise OmniedgeError(
            "the fused q/k RMSNorm is an ort-flavour graph for CUDA only (ONNX Runtime's CPU kernel lacks it)",
            "export with --qk-norm separate, or --device cuda --flavour ort",
        )
    t_start = time.perf_counter()
    checkpoint = check_checkpoint_dir(checkpoint)
    out = Path(out)
    if out.resolve() == checkpoint.resolve():
        raise OmniedgeError("the bundle directory is the checkpoint directory", "pass another -o/--out")
    check_replaceable(out, BUNDLE)  # before anything loads: refuse a folder that is not a bundle
    config = read_config(checkpoint)
    raw_config = json.loads((checkpoint / "config.json").read_text())
    source = SafetensorsDir(checkpoint)
    if raw_config.get("omniedge_quantization") and not any(n.endswith(".qweight") for n in source.names()):
        raise OmniedgeError(
            f"{checkpoint} says it is INT4 but has no int4.safetensors (no packed tensors)",
            "copy the whole checkpoint, or re-run `omniedge compress`",
        )
    visual, audio = load_encoders(source, config)
    shapes = {**param_shapes(visual, VISION_PREFIX), **param_shapes(audio, AUDIO_PREFIX)}
    enc_store = load_int4(checkpoint, shapes, prefix=(VISION_PREFIX, AUDIO_PREFIX))
    size = check_image_size(image_size, visual.config) if image_size else default_image_size(visual.config)
    try:
        tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise OmniedgeError(
            f"cannot read {checkpoint}/tokenizer.json: {e}", "re-create the checkpoint"
        ) from e
    table = translation_table()
    special, eos = _special_tokens(tokenizer)
    meta = read_meta(checkpoint)
    dtype = "float16" if (flavour == "ort" and device == "cuda") else "float32"
    num_deepstack = len(config.thinker_config.vision_config.deepstack_visual_indexes)

    with atomic_dir(out, BUNDLE) as tmp:
        shutil.copyfile(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
        embed = _write_embeddings(source, tmp, dtype)
        quantization: dict[str, Any] | None = None
        thinker_float: list[str] = []
        cost: dict[str, Any] = {}

        def thinker(p: Path) -> None:
            if flavour == "ort":
                opts = Options(dtype=dtype, fused_qk_norm=fused_qk_norm, moe_kernel=moe_kernel)
                cost.update(export_thinker_ort(source, raw_config, p, num_deepstack, opts, progress=progress))
            else:
                thinker_float.extend(_export_portable_thinker(checkpoint, p, table))

        jobs = {
            "vision": lambda p: export_vision(
                visual, module_names(visual, VISION_PREFIX), enc_store, size, p, table
            ),
            "audio": lambda p: export_audio(audio, module_names(audio, AUDIO_PREFIX), enc_store, p, table),
            "thinker": thinker,
        }
        components: dict[str, Any] = {}
        bar = tqdm(COMPONENTS, desc="export", unit="graph", disable=not progress)
        for name in bar:
            bar.set_description(f"export {name}")
            path = tmp / f"{name}.onnx"
            jobs[name](path)
            if not (name == "thinker" and flavour == "ort"):  # hand-built: contract names, contrib ops
                rename_dims(path, DIM_NAMES)
                check_graph(path)
            components[name] = component_record(path, tmp)
            bar.write(f"  {name}.onnx  {components[name]['weight_bytes'] / 2**20:.1f} MiB of weights")
        ops = ORT_OPS if flavour == "ort" else PORTABLE_OPS
        quantization = _quantization(raw_config, [*warn_unused(enc_store), *thinker_float], ops)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model": {
                "name": str(meta.get("model") or checkpoint.name),
                "checkpoint": str(checkpoint.resolve()),
                "checkpoint_meta": meta,
                "quantization": quantization,
            },
            "builder": {**_versions(), "export": _run_stats(t_start)},
            "tokenizer": "tokenizer.json",
            "special_tokens": special,
            "eos_token_ids": eos,
            "text": _text_section(config),
            "embed_tokens": {**embed, "sha256": file_sha256(tmp / "embed_tokens.npy")},
            "preprocess": _preprocess(config, size),
            "thinker_graph": {
                **_thinker_graph(flavour, dtype, config, ["CUDAExecutionProvider"] if fused_qk_norm else []),
                "decode_cost": cost or None,
                "fused_qk_norm": fused_qk_norm,
                "moe_kernel": moe_kernel,
                "custom_ops": custom_ops_of(moe_kernel),
            },
            "components": components,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return out


ORT_OPS = {"linear_op": "com.microsoft.MatMulNBits", "experts_op": "com.microsoft.QMoE (one per MoE layer)"}
PORTABLE_OPS = {
    "linear_op": "com.microsoft.MatMulNBits",
    "experts_op": "If: decode gathers top-k packed experts, prefill all experts once; unpacked with Cast, Floor, Mul, Sub",
}


def _quantization(
    raw_config: dict[str, Any], float_fallback: list[str], ops: dict[str, str]
) -> dict[str, Any] | None:
    cfg = raw_config.get("omniedge_quantization")
    if not cfg:
        return None
    return {
        **{k: v for k, v in cfg.items() if k != "modules"},
        "int4_tensors": len(cfg.get("modules", [])),
        "exported_as_float": float_fallback,
        **ops,
    }


def _run_stats(t_start: float) -> dict[str, float]:
    """Wall time so far and the process's peak resident memory (what a 30B export needs of the host)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"seconds": round(time.perf_counter() - t_start, 1), "peak_host_rss_bytes": int(peak)}


def export_cli(
    checkpoint: str,
    out: Path,
    image_size: int | None,
    flavour: str = "ort",
    device: str = "cpu",
    fused_qk_norm: bool | None = None,
    moe_kernel: str = "qmoe",
) -> None:
    """What `omniedge export` runs: resolve a name like `tiny`, export, print where the bundle went."""
    from omniedge.models.registry import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    bundle = export_bundle(
        path,
        Path(out),
        image_size=image_size,
        flavour=flavour,
        device=device,
        fused_qk_norm=fused_qk_norm,
        moe_kernel=moe_kernel,
    )
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
    run = json.loads((bundle / MANIFEST).read_text())["builder"]["export"]
    print(
        f"bundle written: {bundle}  ({size / 2**20:.1f} MiB) in {run['seconds']:.0f} s, "
        f"peak host memory {run['peak_host_rss_bytes'] / 2**30:.2f} GiB"
    )
