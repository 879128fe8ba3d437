"""The training loop on accelerate: one process per device, micro-batches, checkpoints, progress, eval.

Nothing here knows how many processes run it: accelerate wraps the student (DDP, or FSDP from an
accelerate config) and the batch plan gives each process its share of the global batch. The loss of a
micro-batch is normalised by the predicted tokens of the whole step divided by processes x accumulation
(accelerate divides by the accumulation, DDP averages over processes), so every token of the global
batch weighs the same however it is split. The learning rate is set from the step number (warmup, then
cosine), so it does not depend on the split either.

Checkpoints (`accelerator.save_state`: weights, optimizer, RNG; plus `state.json`: step, step count,
curve, evaluations) go to RUN_DIR/checkpoint every `save_every` steps, written beside and renamed, so a
run killed at any moment resumes from its last complete checkpoint and continues with the same batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_json
from omniedge.distill.data import BatchPlan, DistillData
from omniedge.distill.loss import distill_loss, rows_at, topk_targets
from omniedge.distill.settings import DistillSettings

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
REFINE_UNTIL = 0.75  # share of the decided steps after which a --time-budget's step count stays


def lr_at(step: int, total: int, s: DistillSettings) -> float:
    """Linear warmup over `warmup_steps`, then cosine down to min_lr_ratio x lr at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    p = min(1.0, (step - s.warmup_steps) / max(1, total - 1 - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class Trainer:
    """Owns the prepared student, its optimizer and the run state; `run()` trains to the end."""

    def __init__(
        self,
        accelerator: Any,
        student: Any,
        optimizer: Any,
        teacher: Any,
        cache: Any,
        data: DistillData,
        plan: BatchPlan,
        settings: DistillSettings,
        tokenizer: Any,
        run_dir: Path,
        qat: bool,
        evaluate: Any = None,
        progress: bool = True,
        fresh: Any = None,
    ) -> None:
        from omniedge.training.batches import ChatTokens

        self.acc, self.model, self.opt = accelerator, student, optimizer
        self.teacher, self.cache, self.data, self.plan, self.s = teacher, cache, data, plan, settings
        self.ct = ChatTokens.from_tokenizer(tokenizer)
        self.run_dir, self.qat, self.evaluate, self.progress = Path(run_dir), qat, evaluate, progress
        self.weights = settings.loss_weights()
        self.fresh = fresh  # omniedge.distill.fresh.FreshSpeech: speech made afresh each step, or None
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.state: dict[str, Any] = {
            "step": 0,
            "total": settings.steps,
            "curve": [],
            "evals": [],
            "seconds": 0.0,
        }

    # ------------------------------------------------------------ checkpoints

    def resume(self) -> bool:
        """Load the last checkpoint of this run directory, if any; True when it did."""
        ckpt = self.run_dir / CHECKPOINT_DIR
        if not (ckpt / STATE_FILE).is_file():
            return False
        self.acc.load_state(str(ckpt))
        self.state = json.loads((ckpt / STATE_FILE).read_text())
        if self.acc.is_main_process:
            print(f"resumed from {ckpt} at step {self.state['step']} of {self.state['total']}", flush=True)
        return True

    def save(self) -> None:
        ckpt, tmp = self.run_dir / CHECKPOINT_DIR, self.run_dir / f"{CHECKPOINT_DIR}.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            atomic_write_json(tmp / STATE_FILE, self.state)
            old = self.run_dir / f"{CHECKPOINT_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            if ckpt.exists():
                ckpt.rename(old)
            tmp.rename(ckpt)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------ one step

    def _loader(self, first_step: int) -> Any:
        """This process's micro-batches from `first_step` on, made ahead in worker processes on a GPU
        machine (collating 288 examples with M-RoPE positions takes ~80 ms of Python)."""
        import torch

        plan, data, ct, rank, accum = self.plan, self.data, self.ct, self.acc.process_index, self.s.grad_accum
        fresh = self.fresh

        class MicroBatches(torch.utils.data.Dataset):  # type: ignore[type-arg]
            def __len__(self) -> int:
                return 1 << 40  # as many as the run needs

            def __getitem__(self, j: int) -> tuple[int, list[int], dict[str, Any]]:
                from omniedge.training.batches import collate

                step, m = divmod(j, accum)
                ids = plan.micro_batches(first_step + step, rank)[m]
                examples = [data.examples[i] for i in ids]
                if fresh is not None:
                    examples += fresh.micro_batch(first_step + step, rank, m)
                return first_step + step, ids, collate(ct, examples, positions=True)

        workers = (
            self.s.loader_workers
            if self.s.loader_workers is not None
            else (4 if self.acc.device.type == "cuda" else 0)
        )
        return iter(
            torch.utils.data.DataLoader(
                MicroBatches(), batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
                pin_memory=self.acc.device.type == "cuda", persistent_workers=False,
            )
        )  # fmt: skip

    def _teacher_targets(self, ids: list[int], batch: dict[str, Any], labels: Any) -> Any:
        import torch

        if self.cache is not None:
            return self.cache.targets(ids, self.acc.device)
        if self.teacher is None:
            return None
        with torch.no_grad(), self.acc.autocast():
            logits = self.teacher(**batch, use_cache=False).logits
        rows, _ = rows_at(logits.float(), labels)
        return topk_targets(rows, self.s.top_k)

    def _forward(self) -> Any:
        from torch.nn.utils import parametrize

        return parametrize.cached() if self.qat else contextlib.nullcontext()

    def step(self, step: int, total: int) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns the global sums."""
        import torch

        lr = lr_at(step, total, self.s)
        for g in self.opt.param_groups:
            g["lr"] = lr
        step_tokens = self.plan.step_tokens(step) + (self.fresh.tokens(step) if self.fresh is not None else 0)
        norm = step_tokens / (self.acc.num_processes * self.s.grad_accum)
        sums = torch.zeros(4, dtype=torch.float64, device=self.acc.device)  # ce, kl, tokens, examples
        grad_norm = float("nan")
        for _ in range(self.s.grad_accum):
            got_step, ids, batch = next(self._batches)
            assert got_step == step, (got_step, step)
            batch = {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            teacher = self._teacher_targets(ids, batch, labels)
            with self.acc.accumulate(self.model):
                with self.acc.autocast(), self._forward():
                    out = self.model(**batch, use_cache=False, output_router_logits=self.s.router_aux > 0)
                    rows, targets = rows_at(out.logits, labels)
                    loss, part = distill_loss(rows, targets, teacher, self.weights, norm)
                    if self.s.router_aux > 0 and out.aux_loss is not None:
                        loss = loss + self.s.router_aux * out.aux_loss
                self.acc.backward(loss)
                if self.acc.sync_gradients:
                    grad_norm = float(self.acc.clip_grad_norm_(self.params, self.s.grad_clip))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            sums += torch.tensor(
                [float(part["ce"]), float(part.get("kl", 0.0)), part["tokens"], int(labels.shape[0])],
                dtype=torch.float64, device=self.acc.device,
            )  # fmt: skip
        total_sums = self.acc.reduce(sums, "sum") if self.acc.num_processes > 1 else sums
        ce, kl, tokens, examples = (float(x) for x in total_sums.tolist())
        return {
            "ce": ce / tokens,
            "kl": kl / tokens,
            "tokens": tokens,
            "examples": examples,
            "lr": lr,
            "grad_norm": grad_norm,
        }

    # ------------------------------------------------------------ the run

    def _decide_total(self, durations: list[float]) -> None:
        """--time-budget: once 10 steps of this process are timed, fix the step count from their median
        after the first two; then decide it again every 50 steps from the median of the last 50 until
        REFINE_UNTIL of the decided steps are done. The data workers and kernels warm up over the first
        hundred or so steps: on the H200 a count decided once at step 50 (~405 ms a step, where the run went on at
        ~260) left 130 s of a 400 s budget unused. The learning-rate schedule follows the count it is
        given, so it only moves while most of the run is ahead. The main process decides for all; the count
        goes into the checkpoint, so a resumed run starts from it."""
        if self.s.steps is not None:
            return
        n = len(durations)
        first = self.state["total"] is None and n == 10
        total = self.state["total"]  # the same in every process, so all of them decide at the same steps
        again = total is not None and n % 50 == 0 and n >= 50 and self.state["step"] < REFINE_UNTIL * total
        if not (first or again):
            return
        from accelerate.utils import broadcast_object_list

        recent = sorted(durations[2:] if first else durations[-50:])
        per_step = float(recent[len(recent) // 2])
        left = self.s.time_budget_s - self.state["seconds"]
        decided = [self.state["step"] + max(1, int(left / per_step))]
        if self.acc.num_processes > 1:
            broadcast_object_list(decided, from_process=0)
        changed = decided[0] != self.state["total"]
        self.state["total"] = decided[0]
        if changed and self.acc.is_main_process and self.progress:
            print(
                f"\n{per_step * 1000:.0f} ms/step -> {decided[0]} steps in {self.s.time_budget_s:.0f} s",
                flush=True,
            )

    def _log(self, step: int, rec: dict[str, float], window: list[dict[str, float]]) -> None:
        w = self.weights
        seconds = sum(r["seconds"] for r in window)  # training steps only, not evals or checkpoints
        n_tok = sum(r["tokens"] for r in window)
        ce = sum(r["ce"] * r["tokens"] for r in window) / n_tok
        kl = sum(r["kl"] * r["tokens"] for r in window) / n_tok
        entry = {
            "step": step,
            "loss": w.ce * ce + w.kl * w.temperature**2 * kl,
            "ce": ce,
            "kl": kl,
            "lr": rec["lr"],
            "grad_norm": rec["grad_norm"],
            "examples_per_step": sum(r["examples"] for r in window) / len(window),
            "examples_per_s": sum(r["examples"] for r in window) / seconds,
            "tokens_per_s": n_tok / seconds,
            "seconds": round(self.state["seconds"], 2),
        }
        self.state["curve"].append(entry)
        if self.acc.is_main_process and self.progress:
            print(
                f"step {step}/{self.state['total']}: loss {entry['loss']:.4f} ce {ce:.4f} kl {kl:.4f} "
                f"lr {rec['lr']:.2e} | {entry['examples_per_s']:.1f} ex/s {entry['tokens_per_s']:.0f} tok/s",
                flush=True,
            )

    def run(self) -> dict[str, Any]:
        """Train from the current state to the last step, checkpointing and evaluating on the way."""
        from tqdm import tqdm

        bar = tqdm(
            total=self.state["total"], initial=self.state["step"], desc="distill", unit="step",
            disable=not (self.progress and self.acc.is_main_process), file=sys.stdout, mininterval=5,
        )  # fmt: skip
        self._batches = self._loader(self.state["step"])
        window: list[dict[str, float]] = self.state.setdefault("window", [])  # checkpointed with the rest
        durations: list[float] = []
        try:
            while self.state["total"] is None or self.state["step"] < self.state["total"]:
                step = self.state["step"]
                t0 = time.perf_counter()
                rec = self.step(step, self.state["total"] or 10**9)
                rec["seconds"] = time.perf_counter() - t0
                self.state["step"] = step = step + 1
                self.state["seconds"] += rec["seconds"]
                window.append(rec)
                bar.total = self.state["total"]
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.weights.ce * rec['ce'] + self.weights.kl * self.weights.temperature**2 * rec['kl']:.3f}"
                )
                durations.append(rec["seconds"])
                self._decide_total(durations)
                last = step == self.state["total"]
                if step % self.s.log_every == 0 or last:
                    self._log(step, rec, window)
                    window.clear()
                if (
                    self.evaluate is not None
                    and self.s.eval_every
                    and (step % self.s.eval_every == 0)
                    and not last
                ):
                    self._eval(step)
                if step % self.s.save_every == 0 or last:
                    self.save()
        finally:
            bar.close()
            del self._batches  # stops the loader's workers
        return self.state

    def _eval(self, step: int) -> None:
        if self.acc.is_main_process:
            res = self.evaluate(self.acc.unwrap_model(self.model))
            self.state["evals"].append({"step": step, "result": res})
        self.acc.wait_for_everyone()
