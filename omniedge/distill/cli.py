"""`omniedge distill TEACHER STUDENT -o OUT --data DATA ...`: the arguments, and the call of `distill()`.

One process: `omniedge distill ...`. Several (data parallel; FSDP from an accelerate config), same code:
`accelerate launch --multi_gpu --num_processes N -m omniedge distill ...` (docs/distill.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omniedge.distill.settings import INT4_CHOICES, PRECISIONS, TRAIN_CHOICES, DistillSettings

EPILOG = """example:
  omniedge compress omni-mini -o out/mini-p50 --no-quantize          # the pruned student
  omniedge distill omni-mini out/mini-p50 -o out/mini-p50-kd --data omni-mini-small --steps 200
  omniedge distill omni-mini out/mini-p50 -o out/mini-p50-kd-int4 --data PACK --int4 qat --time-budget 300
  accelerate launch --multi_gpu --num_processes 2 -m omniedge distill omni-mini out/mini-p50 -o OUT --data PACK
"""


def add_arguments(d: argparse.ArgumentParser) -> None:
    dflt = DistillSettings()
    d.add_argument("teacher", help="teacher checkpoint directory, or `omni-mini` / `tiny`")
    d.add_argument(
        "student", help="student checkpoint (e.g. `omniedge compress TEACHER --no-quantize`); INT4 too"
    )
    d.add_argument(
        "-o", "--out", type=Path, help="output checkpoint directory (required unless --cache-only)"
    )
    d.add_argument(
        "--data", required=True, help="training pack, dataset directory, or `omni-mini` / `omni-mini-small`"
    )
    d.add_argument("--steps", type=int, help="optimizer steps (default: as many as --time-budget allows)")
    d.add_argument(
        "--time-budget", type=float, default=dflt.time_budget_s, help="seconds of training without --steps"
    )
    d.add_argument("--batch", type=json.loads, help='global examples per task and step, JSON (default {"text": 32, '
                   '"image": 128, "speech": 96, "mixed": 32}; missing tasks keep theirs, 0 drops one)')  # fmt: skip
    d.add_argument(
        "--grad-accum", type=int, default=dflt.grad_accum, help="micro-batches per step and process"
    )
    d.add_argument("--lr", type=float, default=dflt.lr)
    d.add_argument("--warmup", type=int, default=dflt.warmup_steps, help="warmup steps")
    d.add_argument("--temperature", type=float, default=dflt.temperature, help="T of the KL term (default 2)")
    d.add_argument("--ce-weight", type=float, default=dflt.ce_weight, help="weight of CE on the labels (0.7)")
    d.add_argument("--kl-weight", type=float, default=dflt.kl_weight, help="weight of T^2 x KL (0.3)")
    d.add_argument("--logit-only", action="store_true", help="KL only (ce 0, kl 1)")
    d.add_argument(
        "--top-k", type=int, help="teacher logits per position (default: all on the fly, 64 cached)"
    )
    d.add_argument(
        "--teacher-cache", type=Path, help="top-k teacher logits directory: built where missing, then read"
    )
    d.add_argument("--cache-only", action="store_true", help="build --teacher-cache and stop")
    d.add_argument(
        "--train", choices=TRAIN_CHOICES, default=dflt.train, help="all | experts (+ routers) | lora"
    )
    d.add_argument("--lora-rank", type=int, default=dflt.lora_rank)
    d.add_argument("--lora-alpha", type=float, default=dflt.lora_alpha)
    d.add_argument("--int4", choices=INT4_CHOICES, default=dflt.int4,
                   help="none: float out; after: distil, then quantize; qat: distil through fake INT4 weights, then "
                   "quantize; auto: after for an INT4 student, else none")  # fmt: skip
    d.add_argument("--int4-recipe", type=Path, help="recipe whose quantize stage finishes the student")
    d.add_argument(
        "--float-out", type=Path, help="also keep the float distilled checkpoint here (with --int4)"
    )
    d.add_argument(
        "--router-aux", type=float, default=dflt.router_aux, help="x the routers' load-balancing loss"
    )
    d.add_argument("--device", default="auto", help="auto | cpu | cuda")
    d.add_argument(
        "--precision", choices=PRECISIONS, default=dflt.precision, help="auto: bf16 on CUDA, fp32 on CPU"
    )
    d.add_argument("--limit", type=int, help="first N training examples per task")
    d.add_argument(
        "--fresh-speech",
        action="store_true",
        help="synthesise the speech and spoken-question examples of every step afresh from the training pack's "
        "sentences and scene questions (teacher on the fly; more --loader-workers on a GPU)",
    )
    d.add_argument(
        "--mixed-kinds",
        type=json.loads,
        help='with --fresh-speech: sampling weight per spoken-question kind, JSON: {"where": 3} (others 1)',
    )
    d.add_argument(
        "--loader-workers", type=int, help="batch-making processes (default: 4 on CUDA, 0 on the CPU)"
    )
    d.add_argument("--save-every", type=int, default=dflt.save_every, help="checkpoint every N steps")
    d.add_argument(
        "--eval-every", type=int, default=dflt.eval_every, help="`omniedge eval` suite every N steps"
    )
    d.add_argument(
        "--eval-limit", type=int, default=dflt.eval_limit, help="eval examples per task (0: no eval)"
    )
    d.add_argument("--log-every", type=int, default=dflt.log_every)
    d.add_argument(
        "--run-dir", type=Path, help="checkpoints for resume (default: $OMNIEDGE_HOME/distill-runs/KEY)"
    )
    d.add_argument("--seed", type=int, default=dflt.seed)
    d.add_argument("--quiet", action="store_true", help="no progress output")


def settings_from(args: argparse.Namespace) -> DistillSettings:
    batch = None
    if args.batch is not None:
        batch = {**DistillSettings().batch, **args.batch} if isinstance(args.batch, dict) else args.batch
    kw: dict[str, Any] = dict(
        seed=args.seed, steps=args.steps, time_budget_s=args.time_budget, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup, temperature=args.temperature, ce_weight=0.0 if args.logit_only else args.ce_weight,
        kl_weight=1.0 if args.logit_only else args.kl_weight, top_k=args.top_k, train=args.train,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, int4=args.int4, router_aux=args.router_aux,
        precision=args.precision, limit=args.limit, save_every=args.save_every, eval_every=args.eval_every,
        eval_limit=args.eval_limit, log_every=args.log_every, fresh_speech=args.fresh_speech,
        loader_workers=args.loader_workers, mixed_kinds=args.mixed_kinds,
    )  # fmt: skip
    if batch is not None:
        kw["batch"] = batch
    return DistillSettings(**kw)


def distill_cli(args: argparse.Namespace) -> Path:
    from omniedge.distill.run import distill
    from omniedge.errors import OmniedgeError

    if args.cache_only and args.teacher_cache is None:
        raise OmniedgeError(
            "--cache-only builds the teacher-logit cache: it needs --teacher-cache DIR", "add it"
        )
    if args.out is None and not args.cache_only:
        raise OmniedgeError("no output directory", "pass -o OUT (the distilled checkpoint)")

    return distill(
        args.teacher,
        args.student,
        args.out,
        args.data,
        settings_from(args),
        device=args.device,
        teacher_cache=args.teacher_cache,
        cache_only=args.cache_only,
        run_dir=args.run_dir,
        float_out=args.float_out,
        int4_recipe=args.int4_recipe,
        progress=not args.quiet,
    )
