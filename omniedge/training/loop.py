"""One training phase: its optimizer, batch stream and step loop, stopping at the phase's end or before a
call's deadline, with validation along the way."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.training.batches import ChatTokens, Example, collate
from omniedge.training.kernels import pick_experts_implementation, set_encoder_attention
from omniedge.training.losses import ctc_greedy, encode_audio, forward_losses, task_losses, token_counts
from omniedge.training.state import DivergenceGuard, RunState
from omniedge.training.stream import StreamSpec, batch_stream

SAVE_RESERVE_S = 15.0  # seconds kept before a deadline to write the run state (~150 MB) or the model


@dataclass
class Run:
    """Everything a phase needs that does not change between phases."""

    cfg: Any  # TrainConfig
    model: Any
    head: Any  # CTC head
    tok: Any
    ct: ChatTokens
    train_data: dict[str, list[Example]]
    val_data: dict[str, list[Example]]
    maker: Any  # SpeechMaker or None
    device: Any
    deadline: float | None  # time.perf_counter() value to stop before, or None
    stop_after: int | None = None  # steps this call may take (all phases together), or None
    steps_taken: int = 0


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(params: list[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def phase_params(run: Run, lm: bool) -> list[tuple[str, Any]]:
    """The encoder phase trains the audio encoder and the CTC head; the others train everything."""
    from omniedge.models.family import thinker_parts

    body = run.model if lm else thinker_parts(run.model).audio_tower
    return [*body.named_parameters(), *(("ctc." + n, p) for n, p in run.head.named_parameters())]


def run_phase(run: Run, state: RunState, opt_state: dict[str, Any] | None) -> tuple[bool, Any]:
    """Train the current phase from `state.step` on; returns (finished, optimizer). Updates `state`."""
    import torch

    cfg, pi = run.cfg, state.phase
    phase = cfg.phases[pi]
    params = phase_params(run, phase.lm)
    opt = torch.optim.AdamW(
        param_groups(params, cfg.weight_decay),
        lr=phase.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=run.device.type == "cuda",
    )
    if opt_state:
        opt.load_state_dict(opt_state)
    spec = StreamSpec(
        batch=phase.batch,
        words_fraction=tuple(phase.words_fraction),  # type: ignore[arg-type]
        curriculum_steps=phase.curriculum_steps,
        spec_augment=cfg.spec_augment,
        speed_perturb=tuple(cfg.speed_perturb),  # type: ignore[arg-type]
        vtlp=tuple(cfg.vtlp),  # type: ignore[arg-type]
    )
    pin = run.device.type == "cuda"
    batches = batch_stream(
        run.ct, run.train_data, spec, (cfg.seed, pi), state.step, cfg.loader_workers, pin, run.maker
    )
    use_amp = run.device.type == "cuda" and cfg.dtype == "bfloat16"
    trained = [p for _, p in params]

    def loss_of(batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=use_amp):
            return forward_losses(
                run.model,
                batch,
                cfg.router_aux_loss_coef,
                cfg.task_weight,
                run.head,
                phase.ctc_weight,
                phase.lm,
            )

    batch = to_device(next(batches), run.device)
    state.kernels["encoder_attention"] = set_encoder_attention(
        run.model, batch, cfg.blockdiag_encoder_attention
    )
    if phase.lm:
        state.kernels["experts"] = pick_experts_implementation(
            run.model, cfg.experts_implementation, run.device, lambda: loss_of(batch)[0].backward()
        )
    opt.zero_grad(set_to_none=True)
    guard = DivergenceGuard(torch.nn.ModuleDict({"model": run.model, "ctc": run.head}), opt)
    guard.lr_scale = state.lr_scale
    total, s0, spent0 = state.totals[pi], state.step, state.seconds[pi]
    t0 = t_mark = time.perf_counter()
    step_s, window = 0.0, []
    from tqdm import tqdm

    bar = tqdm(total=total, initial=s0, desc=phase.name, unit="step", mininterval=5, file=sys.stdout)
    finished = True
    try:
        while total is None or state.step < total:
            now = time.perf_counter()
            late = run.deadline is not None and now + 3 * step_s + SAVE_RESERVE_S > run.deadline
            if late or (run.stop_after is not None and run.steps_taken >= run.stop_after):
                finished = False
                break
            if batch is None:
                batch = to_device(next(batches), run.device)
            lr = lr_at(state.step, total or 10**9, phase.lr, phase.warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr * guard.lr_scale
            loss, logged = loss_of(batch)
            batch = None
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip))
            state.step += 1
            run.steps_taken += 1
            bar.update(1)
            if not guard.check(state.step, gnorm, float(loss.detach())):
                continue  # update skipped, weights rolled back to the last good snapshot
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.append({**logged, "loss": float(loss.detach()), "grad_norm": gnorm})
            done = state.step - s0
            step_s = (time.perf_counter() - t0) / done
            if total is None and done == 20:
                t_mark = time.perf_counter()  # loader workers and kernels are warm from here on
            if total is None and done == 60:
                per_step = (time.perf_counter() - t_mark) / 40
                left = phase.seconds - spent0 - (time.perf_counter() - t0)
                total = state.totals[pi] = max(state.step + 1, state.step + int(left / per_step))
                bar.total = total
                print(f"\n{phase.name}: {per_step * 1000:.0f} ms/step -> {total} steps", flush=True)
            if state.step % 25 == 0 or state.step == total:
                rec = _log(state, window, phase.name, lr, spent0 + time.perf_counter() - t0)
                window = []
                if state.step % 100 == 0:
                    print(f"\n{phase.name} step {state.step}: " + " ".join(
                        f"{k}={v:.3f}" for k, v in rec.items() if isinstance(v, float)), flush=True)  # fmt: skip
            if state.step % cfg.val_every == 0 or state.step == total:
                v = validate(run, phase.lm)
                state.curve.append({"phase": phase.name, "step": state.step, "val": v})
                print(f"\nval @ {phase.name} {state.step}: {v}", flush=True)
    finally:
        bar.close()
        del batches
    if window:  # paused between log points
        _log(state, window, phase.name, lr_at(state.step, total or 10**9, phase.lr, phase.warmup_steps,
             cfg.min_lr_ratio), spent0 + time.perf_counter() - t0)  # fmt: skip
    state.seconds[pi] = spent0 + time.perf_counter() - t0
    ran, took = state.step - s0, time.perf_counter() - t0
    print(f"\n{phase.name}: steps {s0}-{state.step} of {total or '?'} in {took:.0f}s"
          f" ({1000 * took / max(1, ran):.0f} ms/step)", flush=True)  # fmt: skip
    state.lr_scale = guard.lr_scale
    state.rollbacks += [int(r) for r in guard.rollbacks]
    state.segments.append({"phase": phase.name, "first_step": s0, "last_step": state.step})
    return finished, opt


def _log(
    state: RunState, window: list[dict[str, float]], phase: str, lr: float, seconds: float
) -> dict[str, Any]:
    """One curve record: the mean of each logged value over the steps since the last record."""
    rec: dict[str, Any] = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
    rec.update(phase=phase, step=state.step, lr=lr, seconds=round(seconds, 1))
    state.curve.append(rec)
    return rec


def validate(run: Run, lm: bool) -> dict[str, float]:
    """Validation losses (answer losses when the thinker trains) and the CTC transcripts' WER."""
    out = evaluate_loss(run.model, run.ct, run.val_data, run.device, run.cfg.val_examples) if lm else {}
    speech = run.val_data.get("speech", [])[: run.cfg.val_examples]
    if speech:
        out["ctc_wer"] = ctc_wer(run.model, run.head, run.tok, run.ct, speech, run.device)
    return out


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


def ctc_transcripts(
    model: Any, head: Any, tok: Any, ct: ChatTokens, exs: list[Example], device: Any
) -> list[str]:
    """What the CTC head reads from each example's audio (greedy), as text."""
    import torch

    model.eval()
    texts: list[str] = []
    with torch.no_grad():
        for s in range(0, len(exs), 64):
            b = collate(ct, exs[s : s + 64], device=device)
            ids = ctc_greedy(head, encode_audio(model, b).float(), token_counts(b["feature_attention_mask"]))
            texts += [tok.decode(x).strip() for x in ids]
    model.train()
    return texts


def ctc_wer(model: Any, head: Any, tok: Any, ct: ChatTokens, exs: list[Example], device: Any) -> float:
    from omniedge.eval.metrics import word_error_rate

    hyps = ctc_transcripts(model, head, tok, ct, exs, device)
    return round(word_error_rate([ex.reference for ex in exs], hyps).value, 4)


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
