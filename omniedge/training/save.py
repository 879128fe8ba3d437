"""The end of a training run: the bf16 model and its omniedge.json (settings, curve, pack identity), then,
when time allows before the deadline, the validation split's scores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_json
from omniedge.hashing import file_sha256
from omniedge.training.loop import Run, final_val_eval
from omniedge.training.state import RunState

FINAL_EVAL_S = 120.0  # the final val eval runs only if this much time is left before the deadline


def save_trained(run: Run, state: RunState, pack: Path, meta: dict[str, Any], out: Path) -> Path:
    """Save the bf16 model (the CTC head stays behind) and, when time allows, score the val split."""
    import torch

    from omniedge.checkpoint import read_meta, save_checkpoint
    from omniedge.training.kernels import restore_encoder_attention

    model, cfg, device = run.model, run.cfg, run.device
    model.eval()
    model.to(torch.bfloat16)  # what is saved; the final eval scores these very (rounded) weights
    model.generation_config.eos_token_id = run.ct.im_end
    model.generation_config.pad_token_id = run.ct.pad
    restore_encoder_attention(model)
    settings = {
        **state.settings,
        "steps": state.totals,
        "kernels": state.kernels,
        "rollbacks": state.rollbacks,
    }
    if cfg.init:
        settings["init_from"] = {
            "path": str(cfg.init),
            "model.safetensors": file_sha256(Path(cfg.init) / "model.safetensors"),
            "training": read_meta(cfg.init).get("training"),
        }
    training = {
        "settings": settings,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "seconds": round(sum(state.seconds), 1),
        "phase_seconds": {p.name: round(s, 1) for p, s in zip(cfg.phases, state.seconds, strict=True)},
        "segments": state.segments,
        "pack": {
            k: meta.get(k)
            for k in ("dataset_manifest_sha256", "tokenizer_sha256", "counts", "image_size", "speech_texts")
        },
        "curve": state.curve,
    }
    meta_out = {
        "model": "omni-mini",
        "made_by": "omniedge.training.train",
        "training": training,
        "preprocess": {"image_size": meta["image_size"], "n_mels": 128, "sampling_rate": 16000},
    }
    model.to("cpu")
    save_checkpoint(model, run.tok, out, meta=meta_out)  # saved first: the eval below may be cut short
    print(f"trained {state.totals} steps in {sum(state.seconds):.0f}s -> {out}", flush=True)
    left = None if run.deadline is None else run.deadline - time.perf_counter()
    if cfg.final_eval and (left is None or left > FINAL_EVAL_S):
        model.to(device)
        training["final_val"] = final_val_eval(model, run.tok, pack, device, meta["image_size"])
        atomic_write_json(out / "omniedge.json", {**read_meta(out), "training": training})
    elif cfg.final_eval:
        print(f"final val eval skipped: {left:.0f}s left before the deadline", flush=True)
    return out
