"""Train omni-mini from scratch on a pack: one mixed-modality batch per step, bf16, router load balancing on.

    python -m omniedge.training.train pack DATASET_DIR PACK_DIR          # here, on the CPU machine
    python -m omniedge.training.train train PACK_DIR -o OUT --device cuda --time-budget 400

Every step sees all four tasks (text, image, speech, mixed); the loss is the mean of the per-task token
losses plus router_aux_loss_coef x the Switch load-balancing loss. The schedule (warmup + cosine) is fixed
by --steps, or by --time-budget, which measures the step time for a few steps and then fixes the step
count (recorded, so `--steps N` reproduces the run with the same seed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.atomic import atomic_write_json
from omniedge.errors import OmniedgeError
from omniedge.outputs import CHECKPOINT, check_replaceable
from omniedge.training.batches import ChatTokens, Example, collate
from omniedge.training.pack import load_pack_examples, read_pack_meta, write_pack

TRAIN_TASKS = ("text", "image", "speech", "mixed")


@dataclass
class TrainConfig:
    """Everything that decides the result; stored in omniedge.json."""

    seed: int = 0
    steps: int | None = None  # None: decided by time_budget_s
    time_budget_s: float = 400.0
    warmup_steps: int = 150
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    batch: dict[str, int] = field(
        default_factory=lambda: {"text": 32, "image": 128, "speech": 96, "mixed": 32}
    )
    task_weight: dict[str, float] = field(
        default_factory=lambda: {"text": 1.0, "image": 1.0, "speech": 1.5, "mixed": 1.0}
    )
    spec_augment: bool = True
    speed_perturb: tuple[float, float] = (0.9, 1.1)
    vtlp: tuple[float, float] = (0.9, 1.1)  # mel-axis warp: a cheap stand-in for unseen voices
    blockdiag_encoder_attention: bool = True  # one masked SDPA per encoder layer (checked, else per chunk)
    router_aux_loss_coef: float = 0.01
    experts_implementation: str = "auto"
    dtype: str = "bfloat16"
    val_every: int = 200
    val_examples: int = 128  # per task, for the periodic validation loss
    loader_workers: int = 4  # batch-making processes (part of the seed -> batches mapping)
    final_eval: bool = True  # score the val split (accuracy, WER, perplexity) after training
    profile_steps: int = 0  # profile this many steps after step 70 (after the step-time estimate)
    init: str | None = None  # start from this checkpoint's weights (a second stage), not from scratch


# ---------------------------------------------------------------- augmentation


def augment_mel(
    mel: np.ndarray,
    rng: np.random.Generator,
    speed: tuple[float, float],
    vtlp: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Speed perturbation (time resampling), vocal-tract-length perturbation (mel-axis warp), SpecAugment."""
    n_mels, frames = mel.shape
    alpha = rng.uniform(*vtlp)
    if alpha != 1.0:
        src = np.clip(np.arange(n_mels) / alpha, 0, n_mels - 1)
        j0 = np.floor(src).astype(int)
        j1 = np.minimum(j0 + 1, n_mels - 1)
        wf = (src - j0).astype(np.float32)[:, None]
        mel = mel[j0] * (1 - wf) + mel[j1] * wf
    factor = rng.uniform(*speed)
    new = max(8, round(frames / factor))
    pos = np.linspace(0, frames - 1, new)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, frames - 1)
    w = (pos - i0).astype(np.float32)
    out = mel[:, i0] * (1 - w) + mel[:, i1] * w
    fill = float(out.mean())
    for _ in range(2):
        width = int(rng.integers(0, 16))
        start = int(rng.integers(0, n_mels - width + 1))
        out[start : start + width] = fill
    for _ in range(2):
        width = int(rng.integers(0, max(1, new // 12)))
        start = int(rng.integers(0, new - width + 1))
        out[:, start : start + width] = fill
    return out.astype(np.float32)


# ---------------------------------------------------------------- batches


def draw_batch(
    ct: ChatTokens, data: dict[str, list[Example]], cfg: TrainConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """One step's examples (fixed count per task, augmented speech) collated with M-RoPE positions."""
    picked: list[Example] = []
    for task in TRAIN_TASKS:
        exs, n = data.get(task, []), cfg.batch.get(task, 0)
        if not exs or n <= 0:
            continue
        for i in rng.integers(0, len(exs), size=n):
            ex = exs[int(i)]
            if ex.mel is not None and cfg.spec_augment:
                mel = augment_mel(ex.mel, rng, cfg.speed_perturb, cfg.vtlp)
                ex = Example(**{**ex.__dict__, "mel": mel})
            picked.append(ex)
    batch = collate(ct, picked, positions=True)
    batch["task_of_row"] = [ex.task for ex in picked]
    return batch


def batch_stream(
    ct: ChatTokens, data: dict[str, list[Example]], cfg: TrainConfig, pin: bool
) -> Iterator[dict[str, Any]]:
    """Endless batches made in worker processes (the GIL stays with the training loop).

    Worker k draws from its own generator seeded (seed, k); the loader reads workers round robin, so the
    batch sequence depends only on the seed and the worker count (both recorded).
    """
    import torch

    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[dict[str, Any]]:
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([cfg.seed, info.id if info else 0])
            while True:
                yield draw_batch(ct, data, cfg, rng)

    workers = cfg.loader_workers
    loader = torch.utils.data.DataLoader(
        Stream(),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )
    return iter(loader)


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


# ---------------------------------------------------------------- loss


def task_losses(logits: Any, labels: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """Mean next-token cross entropy per task (over labelled tokens of that task's rows)."""
    import torch
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    valid = (shift_labels != -100).float()
    out = {}
    for task in dict.fromkeys(tasks):
        rows = torch.tensor([t == task for t in tasks], device=logits.device)
        num = (tok_loss * valid)[rows].sum()
        den = valid[rows].sum().clamp_min(1.0)
        out[task] = num / den
    return out


def forward_losses(
    model: Any, batch: dict[str, Any], aux_coef: float, weights: dict[str, float]
) -> tuple[Any, dict[str, float]]:
    """(total loss tensor, per-task float losses) for one collated batch."""
    from omniedge.models.family import thinker_of

    tasks = batch["task_of_row"]
    kwargs = {k: v for k, v in batch.items() if k not in ("labels", "task_of_row")}
    out = thinker_of(model)(**kwargs, output_router_logits=True, use_cache=False)
    per_task = task_losses(out.logits, batch["labels"], tasks)
    total = sum(weights.get(t, 1.0) * v for t, v in per_task.items()) / sum(
        weights.get(t, 1.0) for t in per_task
    )
    aux = out.aux_loss if out.aux_loss is not None else 0.0
    total = total + aux_coef * aux
    logged = {t: float(v.detach()) for t, v in per_task.items()}
    logged["aux"] = float(aux.detach()) if hasattr(aux, "detach") else float(aux)
    return total, logged


# ---------------------------------------------------------------- encoder attention in one call

BLOCKDIAG = "flash_blockdiag_sdpa"  # "flash" in the name makes the encoders hand over cu_seqlens


def blockdiag_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention within each cu_seqlens chunk as ONE masked SDPA call (same math as a call per chunk)."""
    import torch
    import torch.nn.functional as F

    n = query.shape[-2]
    seg = torch.searchsorted(
        cu_seq_lens_q[1:].to(query.device), torch.arange(n, device=query.device), right=True
    )
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _encode(parts: Any, batch: dict[str, Any]) -> list[Any]:
    th = parts.thinker
    out = []
    if "pixel_values" in batch:
        out.append(th.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0])
    if "input_features" in batch:
        out.append(
            th.get_audio_features(batch["input_features"], batch["feature_attention_mask"]).last_hidden_state
        )
    return out


def set_encoder_attention(model: Any, batch: dict[str, Any], enable: bool) -> str:
    """Switch the vision and audio encoders to block-diagonal SDPA if it reproduces the per-chunk result."""
    import torch
    from transformers import AttentionInterface

    from omniedge.models.family import thinker_parts

    parts = thinker_parts(model)
    encoders = [e for e in (parts.visual, parts.audio_tower) if e is not None]
    before = [e.config._attn_implementation for e in encoders]
    if not enable:
        return ",".join(str(b) for b in before)
    AttentionInterface.register(BLOCKDIAG, blockdiag_sdpa)
    with torch.no_grad():
        ref = _encode(parts, batch)
        for e in encoders:
            e.config._attn_implementation = BLOCKDIAG
        try:
            new = _encode(parts, batch)
            err = max(
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
                for a, b in zip(new, ref, strict=True)
            )
        except Exception as e:  # an internal API moved: keep the per-chunk path
            print(f"block-diagonal encoder attention unavailable ({type(e).__name__}: {e})", flush=True)
            err = float("inf")
    if err > 1e-4:
        for e, b in zip(encoders, before, strict=True):
            e.config._attn_implementation = b
        print(f"encoder attention: per chunk (block-diagonal rel. error {err:.2e})", flush=True)
        return ",".join(str(b) for b in before)
    print(f"encoder attention: block-diagonal SDPA (rel. error vs per chunk {err:.1e})", flush=True)
    return BLOCKDIAG


def restore_encoder_attention(model: Any, impl: str = "sdpa") -> None:
    from omniedge.models.family import thinker_parts

    parts = thinker_parts(model)
    for e in (parts.visual, parts.audio_tower):
        if e is not None and e.config._attn_implementation == BLOCKDIAG:
            e.config._attn_implementation = impl


# ---------------------------------------------------------------- experts kernel choice


def pick_experts_implementation(model: Any, batch: dict[str, Any], cfg: TrainConfig, device: Any) -> str:
    """On CUDA, time one forward+backward with each experts kernel that works; keep the fastest."""
    import torch

    if cfg.experts_implementation != "auto":
        model.set_experts_implementation(cfg.experts_implementation)
        return cfg.experts_implementation
    if getattr(device, "type", str(device)) != "cuda":
        model.set_experts_implementation("eager")
        return "eager"
    timings: dict[str, float] = {}
    for impl in ("grouped_mm", "eager"):
        try:
            model.set_experts_implementation(impl)
            for rep in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = forward_losses(model, batch, cfg.router_aux_loss_coef, cfg.task_weight)
                loss.backward()
                torch.cuda.synchronize()
                if rep == 2:
                    timings[impl] = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
        except Exception as e:  # an unsupported kernel/dtype combination: skip it
            print(f"experts_implementation={impl} failed: {type(e).__name__}: {e}", file=sys.stderr)
            model.zero_grad(set_to_none=True)
    if not timings:
        raise OmniedgeError(
            "no experts implementation ran a training step", "check the torch/transformers install"
        )
    best = min(timings, key=timings.__getitem__)
    print(f"experts implementation timings (s/step): {timings} -> {best}", flush=True)
    model.set_experts_implementation(best)
    return best


# ---------------------------------------------------------------- training


class DivergenceGuard:
    """Keeps a snapshot of weights and optimizer state every 100 good steps; on a non-finite loss or
    gradient it skips the update, restores the snapshot and halves the learning rate."""

    def __init__(self, model: Any, opt: Any, every: int = 100) -> None:
        self.model, self.opt, self.every = model, opt, every
        self.lr_scale, self.rollbacks = 1.0, []
        self.snap: tuple[dict[str, Any], dict[str, Any]] | None = None

    def check(self, step: int, grad_norm: float, loss: float) -> bool:
        import copy

        if math.isfinite(grad_norm) and math.isfinite(loss):
            if step % self.every == 1 or self.snap is None:
                self.snap = (
                    {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                    copy.deepcopy(self.opt.state_dict()),
                )
            return True
        self.opt.zero_grad(set_to_none=True)
        if self.snap is not None:
            self.model.load_state_dict(self.snap[0])
            self.opt.load_state_dict(self.snap[1])
        self.lr_scale *= 0.5
        self.rollbacks.append(step)
        print(f"\nstep {step}: non-finite loss/gradient -> rolled back, lr x{self.lr_scale:g}", flush=True)
        return False


def _load_init(path: str, pack: Path) -> Any:
    """Weights of an earlier stage (fp32, train mode); its tokenizer must be the pack's."""
    from omniedge.checkpoint import file_sha256, load_checkpoint

    if file_sha256(Path(path) / "tokenizer.json") != file_sha256(pack / "tokenizer.json"):
        raise OmniedgeError(
            f"{path} was trained with another tokenizer than the pack {pack}",
            "continue from a checkpoint trained on this pack, or re-pack with --tokenizer",
        )
    model, _ = load_checkpoint(path)
    return model.train()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate_loss(
    model: Any, ct: ChatTokens, data: dict[str, list[Example]], device: Any, per_task: int = 128
) -> dict[str, float]:
    """Mean per-task loss on (a fixed prefix of) the validation split."""
    import torch

    from omniedge.models.family import thinker_of

    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for task, exs in data.items():
            losses = []
            for s in range(0, min(len(exs), per_task), 64):
                chunk = exs[s : min(s + 64, per_task)]
                b = collate(ct, chunk, positions=True, device=device)
                logits = thinker_of(model)(
                    **{k: v for k, v in b.items() if k != "labels"}, use_cache=False
                ).logits
                losses.append(float(task_losses(logits, b["labels"], [task] * len(chunk))[task]))
            if losses:
                out[task] = float(np.mean(losses))
    model.train()
    return out


def train(pack: str | Path, out: str | Path, cfg: TrainConfig, device_name: str = "cuda") -> Path:
    """Train omni-mini on a pack and write the checkpoint (bf16 weights) to `out`; returns `out`."""
    import torch
    from tokenizers import Tokenizer

    from omniedge.checkpoint import save_checkpoint
    from omniedge.models.omni_mini import build_omni_mini

    pack = Path(pack)
    meta = read_pack_meta(pack)
    check_replaceable(out, CHECKPOINT)  # now, not after hours of training
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OmniedgeError("--device cuda asked for, but torch sees no CUDA GPU", "pass --device cpu")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    tok = Tokenizer.from_file(str(pack / "tokenizer.json"))
    ct = ChatTokens.from_tokenizer(tok)
    t_load = time.perf_counter()
    train_data = {t: load_pack_examples(pack, t, "train", dither_seed=cfg.seed) for t in TRAIN_TASKS}
    val_data = {t: load_pack_examples(pack, t, "val") for t in TRAIN_TASKS}
    train_data = {t: v for t, v in train_data.items() if v}
    val_data = {t: v for t, v in val_data.items() if v}
    if not train_data:
        raise OmniedgeError(f"{pack} holds no training examples", "re-make the pack from a built dataset")
    print(
        f"loaded pack in {time.perf_counter() - t_load:.1f}s: "
        + ", ".join(f"{t}={len(v)}" for t, v in train_data.items()),
        flush=True,
    )

    batches = batch_stream(ct, train_data, cfg, pin=device.type == "cuda")  # forks before CUDA starts
    if device.type == "cuda":
        # cuDNN's SDPA builds a new plan for every new sequence length (~10 ms of CPU per call, seen in a
        # profile here); the encoders' lengths change every step, so use the flash/efficient kernels.
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = _load_init(cfg.init, pack) if cfg.init else build_omni_mini(tok, seed=cfg.seed)
    model.config.thinker_config.text_config.router_aux_loss_coef = cfg.router_aux_loss_coef
    model.to(device).train()
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )
    first = to_device(next(batches), device)
    attn = set_encoder_attention(model, first, cfg.blockdiag_encoder_attention)
    impl = pick_experts_implementation(model, first, cfg, device)
    use_amp = device.type == "cuda" and cfg.dtype == "bfloat16"

    curve: list[dict[str, Any]] = []
    total = cfg.steps
    t0 = time.perf_counter()
    step, t_mark = 0, t0
    window: list[dict[str, float]] = []
    guard = DivergenceGuard(model, opt)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="train", unit="step", mininterval=5, file=sys.stdout)
    try:
        while total is None or step < total:
            if cfg.profile_steps and step == 70:
                prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                )
                prof.__enter__()
            if cfg.profile_steps and step == 70 + cfg.profile_steps:
                prof.__exit__(None, None, None)
                key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=18), flush=True)
                print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)
            batch = to_device(next(batches), device)
            lr = lr_at(step, total or 10**9, cfg) * guard.lr_scale
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, logged = forward_losses(model, batch, cfg.router_aux_loss_coef, cfg.task_weight)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            step += 1
            bar.update(1)
            if not guard.check(step, gnorm, float(loss.detach())):
                continue  # update skipped, weights rolled back to the last good snapshot
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.append({**logged, "loss": float(loss.detach()), "grad_norm": gnorm})
            if total is None and step == 20:
                t_mark = time.perf_counter()  # loader workers and kernels are warm from here on
            if total is None and step == 60:
                per_step = (time.perf_counter() - t_mark) / 40
                total = max(step + 1, step + int((cfg.time_budget_s - (time.perf_counter() - t0)) / per_step))
                bar.total = total
                print(
                    f"\n{per_step * 1000:.0f} ms/step -> {total} steps in {cfg.time_budget_s:.0f}s",
                    flush=True,
                )
            if window and (step % 25 == 0 or step == total):
                rec = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                rec.update(step=step, lr=lr, seconds=round(time.perf_counter() - t0, 1))
                curve.append(rec)
                window = []
                if step % 100 == 0:
                    print(
                        f"\nstep {step}: "
                        + " ".join(f"{k}={v:.3f}" for k, v in rec.items() if k not in ("step",)),
                        flush=True,
                    )
            if val_data and (step % cfg.val_every == 0 or step == total):
                v = evaluate_loss(model, ct, val_data, device, cfg.val_examples)
                curve.append({"step": step, "val": v})
                print(f"\nval @ {step}: {v}", flush=True)
    finally:
        bar.close()
        del batches
    train_seconds = time.perf_counter() - t0

    model.eval()
    model.to(torch.bfloat16)  # what is saved; the final eval scores these very (rounded) weights
    model.generation_config.eos_token_id = ct.im_end
    model.generation_config.pad_token_id = ct.pad
    restore_encoder_attention(model)
    settings = {
        **asdict(cfg),
        "steps": total,
        "experts_implementation": impl,
        "encoder_attention": attn,
        "rollbacks": guard.rollbacks,
    }
    if cfg.init:
        from omniedge.checkpoint import file_sha256, read_meta

        settings["init_from"] = {
            "path": str(cfg.init),
            "model.safetensors": file_sha256(Path(cfg.init) / "model.safetensors"),
            "training": read_meta(cfg.init).get("training"),
        }
    meta_out = {
        "model": "omni-mini",
        "made_by": "omniedge.training.train",
        "training": {
            "settings": settings,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "seconds": round(train_seconds, 1),
            "pack": {
                k: meta.get(k)
                for k in ("dataset_manifest_sha256", "tokenizer_sha256", "counts", "image_size")
            },
            "curve": curve,
        },
        "preprocess": {"image_size": meta["image_size"], "n_mels": 128, "sampling_rate": 16000},
    }
    model.to("cpu")
    save_checkpoint(model, tok, out, meta=meta_out)  # saved first: the eval below may be cut short
    print(f"trained {total} steps in {train_seconds:.0f}s -> {out}", flush=True)
    if cfg.final_eval:
        model.to(device)
        meta_out["training"]["final_val"] = final_val_eval(model, tok, pack, device, meta["image_size"])
        from omniedge.checkpoint import read_meta

        atomic_write_json(Path(out) / "omniedge.json", {**read_meta(out), "training": meta_out["training"]})
    return Path(out)


def final_val_eval(model: Any, tok: Any, pack: Path, device: Any, image_size: int) -> dict[str, Any]:
    """The eval suite on the pack's val split (unseen voices and layouts), fp32 compute on bf16 weights."""
    import torch

    from omniedge.eval.cli import format_result
    from omniedge.eval.suite import TorchPredictor, run_suite, suite_data_from_pack

    model.to(torch.float32)
    model.set_experts_implementation("eager")
    predictor = TorchPredictor(model, tok, device=str(device), image_size=image_size, batch_size=64)
    res = run_suite(predictor, suite_data_from_pack(pack, "val"), progress=False)
    print(
        format_result({"model": "trained", "suite": "pack val split", "device": str(device), **res}),
        flush=True,
    )
    model.to(torch.bfloat16)
    return res


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m omniedge.training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("pack", help="tokenize + featurize a built dataset into a compact pack (CPU)")
    k.add_argument("dataset", type=Path)
    k.add_argument("out", type=Path)
    k.add_argument("--vocab-size", type=int, default=None)
    k.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.json instead of training one")
    k.add_argument("--splits", default="train,val", help="comma-separated splits to pack (default train,val)")
    k.add_argument("--val-limit", type=int, default=200, help="records per media task in the val split")
    k.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="TASK/SPLIT=N",
        help="first N records of a task split, e.g. speech/train=2400 (repeat; a smaller pack for a device call)",
    )
    k.add_argument("--mel-levels", type=int, default=16, help="log-mel quantization levels (<= 256)")
    t = sub.add_parser("train", help="train omni-mini on a pack")
    t.add_argument("pack", type=Path)
    t.add_argument("-o", "--out", type=Path, required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int)
    t.add_argument(
        "--time-budget", type=float, default=400.0, help="seconds of training when --steps is not given"
    )
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument(
        "--batch", type=json.loads, help='per-task batch sizes, JSON: {"text": 32, "image": 128, ...}'
    )
    t.add_argument("--experts-impl", default="auto", help="auto | eager | grouped_mm | batched_mm")
    t.add_argument("--val-every", type=int, default=200)
    t.add_argument("--val-examples", type=int, default=128, help="per task, for the periodic val loss")
    t.add_argument("--no-final-eval", action="store_true", help="skip scoring the val split after training")
    t.add_argument(
        "--profile-steps", type=int, default=0, help="profile N steps after step 70 (prints tables)"
    )
    t.add_argument("--init", help="continue from this checkpoint's weights (fresh optimizer and schedule)")
    t.add_argument("--warmup", type=int, default=150, help="warmup steps")
    t.add_argument("--loader-workers", type=int, default=4, help="batch-making processes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "pack":
            from tokenizers import Tokenizer

            from omniedge.models.omni_mini import IMAGE_SIZE, VOCAB_SIZE, corpus_texts, train_tokenizer

            if args.tokenizer:
                tok = Tokenizer.from_file(str(args.tokenizer))
            else:
                tok = train_tokenizer(corpus_texts(args.dataset, "train"), args.vocab_size or VOCAB_SIZE)
            splits = tuple(x for x in args.splits.split(",") if x)
            limits = {f"{t}/val": args.val_limit for t in ("image", "speech", "mixed")}
            for item in args.limit:
                where, _, n = item.partition("=")
                if not n.isdigit() or where.count("/") != 1:
                    raise OmniedgeError(
                        f"--limit {item!r} is not TASK/SPLIT=N", "e.g. --limit speech/train=2400"
                    )
                limits[where] = int(n)
            write_pack(
                args.dataset,
                args.out,
                tok,
                image_size=IMAGE_SIZE,
                splits=splits,
                limits=limits,
                mel_levels=args.mel_levels,
            )
            print(json.dumps(read_pack_meta(args.out)["counts"]))
        else:
            cfg = TrainConfig(
                seed=args.seed,
                steps=args.steps,
                time_budget_s=args.time_budget,
                lr=args.lr,
                experts_implementation=args.experts_impl,
                val_every=args.val_every,
                val_examples=args.val_examples,
                final_eval=not args.no_final_eval,
                profile_steps=args.profile_steps,
                init=args.init,
                warmup_steps=args.warmup,
                loader_workers=args.loader_workers,
            )
            if args.batch:
                cfg.batch = {**cfg.batch, **args.batch}
            train(args.pack, args.out, cfg, args.device)
    except OmniedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
