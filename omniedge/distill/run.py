"""`distill()`: teacher + student + data -> distilled checkpoint, resumable, on one process or many.

Order: check the output can be written; load the student and the data; check the pair; the teacher on
the fly or its top-k cache (built first where missing); what to train (and INT4 fake quantization);
eval before (a fresh run); accelerate; resume from RUN_DIR if a checkpoint of the same run is there;
train; write the checkpoint (float, or INT4 through the compress stage); eval what was written; record
everything in its omniedge.json; remove what the run left in RUN_DIR.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_json
from omniedge.checkpoint import META_FILE, read_meta
from omniedge.distill import evaluation
from omniedge.distill.fresh import FRESH_TASKS, FreshSpeech
from omniedge.distill.settings import DistillSettings, run_key
from omniedge.errors import OmniedgeError
from omniedge.outputs import CHECKPOINT, DISTILL_RUN, check_replaceable


def make_accelerator(device: str, precision: str, grad_accum: int) -> Any:
    """accelerate's Accelerator for `device` (auto, cpu, cuda); a missing GPU that was asked for is an error."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if device not in ("auto", "cpu", "cuda"):
        raise OmniedgeError(f"--device {device!r} is not supported", "use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OmniedgeError(
            "--device cuda asked for, but torch sees no CUDA GPU",
            "run on a machine with a GPU (and a CUDA build of torch), or pass --device cpu",
        )
    cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "auto":
        precision = "fp32" if cpu else "bf16"
    if precision == "bf16" and cpu:
        raise OmniedgeError("--precision bf16 is for GPUs (bf16 autocast)", "use --precision fp32 on the CPU")
    return Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=grad_accum,
        # a micro-batch without images (or audio) leaves that encoder unused: DDP must allow it
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _experts_impl(model: Any, device: Any) -> str:
    """grouped_mm on CUDA (the fastest measured for omni-mini training), eager on the CPU."""
    impl = "grouped_mm" if getattr(device, "type", str(device)) == "cuda" else "eager"
    model.set_experts_implementation(impl)
    return impl


def _is_fsdp(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _run_dir(run_dir: Path | None, key: str, teacher: Path, student: Path, main: bool) -> Path:
    """RUN_DIR for checkpoints: given, or $OMNIEDGE_HOME/distill-runs/KEY; never another run's."""
    from omniedge.paths import home

    run_dir = Path(run_dir) if run_dir is not None else home() / "distill-runs" / key
    if main:
        check_replaceable(run_dir, DISTILL_RUN)
        marker = run_dir / "run.json"
        if marker.is_file() and json.loads(marker.read_text()).get("key") != key:
            raise OmniedgeError(
                f"the run directory {run_dir} belongs to another distillation run (other teacher, student, "
                "data or settings)",
                "pass a new --run-dir, or the same command as the run it belongs to",
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"key": key, "teacher": str(teacher), "student": str(student)})
    return run_dir


def _clean_run_dir(run_dir: Path) -> None:
    """The run is complete: remove what it left in RUN_DIR (checkpoint, float scratch), and RUN_DIR if empty."""
    from omniedge.distill.loop import CHECKPOINT_DIR

    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.tmp", f"{CHECKPOINT_DIR}.old", "float"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / "run.json").unlink(missing_ok=True)
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _eval_written(path: Path, suite: Any, device: Any, image_size: int) -> dict[str, Any]:
    """The suite on the checkpoint as written (INT4 modules and all), the way `omniedge eval` loads it."""
    from omniedge.checkpoint import load_checkpoint

    model, tok = load_checkpoint(path)
    return evaluation.score(model, tok, suite, device, image_size)


def _check_fresh(data_source: str | Path, teacher_cache: Path | None) -> None:
    """--fresh-speech reads a training pack's sentences and needs the teacher on the fly."""
    from omniedge.distill.data import resolve_source

    if teacher_cache is not None:
        raise OmniedgeError(
            "--fresh-speech makes new audio every step, which a teacher-logit cache cannot hold",
            "drop --teacher-cache (the teacher runs on the fly) or drop --fresh-speech",
        )
    if resolve_source(data_source)[0] != "pack":
        raise OmniedgeError(
            f"--fresh-speech synthesises from a training pack's speech sentences; {data_source} is a data set",
            "pack it: python -m omniedge.training.train pack DATASET OUT, and pass --data OUT",
        )


def _versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def distill(
    teacher_name: str,
    student_name: str,
    out: Path | None,
    data_source: str | Path,
    settings: DistillSettings,
    *,
    device: str = "auto",
    teacher_cache: Path | None = None,
    cache_only: bool = False,
    cache_k: int = 64,
    run_dir: Path | None = None,
    float_out: Path | None = None,
    int4_recipe: Path | None = None,
    progress: bool = True,
) -> Path:
    """Distil `teacher_name` into `student_name` on `data_source`'s train split; write OUT."""
    import torch

    from omniedge.distill import finish, pair, trainable
    from omniedge.distill import teacher_cache as tc
    from omniedge.distill.data import BatchPlan, load_data
    from omniedge.distill.loop import CHECKPOINT_DIR, STATE_FILE, Trainer
    from omniedge.models.family import thinker_of
    from omniedge.models.registry import resolve_checkpoint

    t_start = time.perf_counter()
    out = Path(out) if out is not None else None
    for p in (out, float_out):
        if p is not None:
            check_replaceable(p, CHECKPOINT)  # now, not after the training
    acc = make_accelerator(device, settings.precision, settings.grad_accum)
    main, fsdp = acc.is_main_process, _is_fsdp(acc)
    say = print if (main and progress) else (lambda *a, **k: None)

    student = pair.load(student_name, torch.float32)
    teacher_path = resolve_checkpoint(teacher_name)
    if student.path.resolve() in ((out or student.path.parent).resolve(), teacher_path.resolve()):
        raise OmniedgeError(
            f"the output {out} or the teacher is the student {student.path}", "write elsewhere"
        )
    fresh_batch = {t: n for t, n in settings.batch.items() if settings.fresh_speech and t in FRESH_TASKS}
    plan_batch = {t: n for t, n in settings.batch.items() if t not in fresh_batch}
    tasks = [t for t, n in plan_batch.items() if n > 0]
    if fresh_batch.get("mixed") and "image" not in tasks:
        tasks.append("image")  # the scene questions spoken afresh
    if settings.fresh_speech:
        _check_fresh(data_source, teacher_cache)
    data = load_data(data_source, "train", student.tokenizer, student.image_size, limit=settings.limit,
                     tasks=tasks, max_text_len=settings.max_text_len)  # fmt: skip
    say(
        f"data: {data.description['examples']} examples, {data.description['predicted_tokens']} predicted tokens"
    )
    fresh = None
    if settings.fresh_speech:
        fresh = FreshSpeech(Path(data_source), student.tokenizer, [data.examples[i] for i in data.by_task.get("image", [])], fresh_batch,
                            settings.seed, acc.num_processes, settings.grad_accum, settings.mixed_kinds)  # fmt: skip
        say(f"fresh speech: {fresh.identity()}")
    modalities = data.modalities | ({"audio"} if any(fresh_batch.values()) else set())
    teacher_meta = pair.load_config_only(teacher_path)
    pair.check_pair(teacher_meta, student, modalities)
    int4 = finish.resolve_int4(settings.int4, student)
    recipe = finish.quantize_recipe(student, int4_recipe) if int4 != "none" else None
    if fsdp and (settings.train == "lora" or int4 == "qat"):
        raise OmniedgeError(
            "under FSDP only --train all/experts without --int4 qat are supported",
            "use data parallel (accelerate launch --multi_gpu), or drop LoRA / QAT",
        )

    # the teacher: its top-k cache (built where missing), or on the fly
    teacher_thinker, cache, cache_info = None, None, None
    identity = pair.checkpoint_identity(teacher_path)
    vocab = teacher_meta.hf_config.thinker_config.text_config.vocab_size
    teacher_dtype = torch.bfloat16 if acc.device.type == "cuda" else torch.float32
    if teacher_cache is not None:
        k = min(settings.top_k or cache_k, vocab)  # k >= vocabulary: every logit, the exact KL
        if main:
            tc.open_cache(teacher_cache, teacher_path, identity, data, k, vocab)
        acc.wait_for_everyone()
        manifest = tc.open_cache(teacher_cache, teacher_path, identity, data, k, vocab, is_main=False)
        if not manifest.get("complete"):  # every process sees the same manifest: the main one wrote it
            th = thinker_of(pair.load(teacher_name, teacher_dtype).model).to(acc.device)
            _experts_impl(th, acc.device)
            tc.build(teacher_cache, tc.read_manifest(teacher_cache), th, student.tokenizer, data, device=acc.device,
                     autocast=acc.autocast, rank=acc.process_index, world=acc.num_processes,
                     barrier=acc.wait_for_everyone, progress=progress)  # fmt: skip
            del th
        cache = tc.TeacherCache(teacher_cache, data, k)
        m = cache.manifest
        cache_info = {
            "dir": str(Path(teacher_cache).resolve()),
            "k": k,
            "mass_t1": m["mass_t1"],
            "mass_t2": m["mass_t2"],
        }
        say(
            f"teacher: top-{k} cache {teacher_cache} ({100 * m['mass_t2']:.1f}% of the teacher's probability at T=2)"
        )
        if cache_only:
            acc.end_training()
            return Path(teacher_cache)
    else:
        teacher_thinker = thinker_of(pair.load(teacher_name, teacher_dtype).model).to(acc.device).eval()
        teacher_thinker.requires_grad_(False)
        _experts_impl(teacher_thinker, acc.device)
        say(
            f"teacher: {teacher_path} on the fly ({f'top-{settings.top_k}' if settings.top_k else 'all logits'})"
        )

    # the student: fake INT4, encoder attention, what to train
    thinker = thinker_of(student.model).to(acc.device)
    qat = int4 == "qat"
    n_fake = 0
    if qat:
        q = finish.quantize_settings(recipe)
        n_fake = trainable.add_fake_int4(thinker, list(q["targets"]), int(q["group_size"]))
    encoder_attention = "sdpa"
    if acc.device.type == "cuda":  # the encoders' per-chunk attention as one call (checked equal at start-up)
        from omniedge.training.batches import ChatTokens, collate
        from omniedge.training.kernels import set_encoder_attention

        sample = data.examples[:: max(1, len(data.examples) // 16)] + (
            fresh.micro_batch(0, 0, 0, limit=4) if fresh else []
        )
        probe = collate(
            ChatTokens.from_tokenizer(student.tokenizer), sample, positions=True, device=acc.device
        )
        probe.pop("labels")
        encoder_attention = set_encoder_attention(thinker, probe, True)
        if fresh is not None:
            fresh.reset()
        if teacher_thinker is not None:
            set_encoder_attention(teacher_thinker, probe, True)
    model, what = trainable.select_trainable(thinker, settings.train, settings.lora_rank, settings.lora_alpha)
    model.train()
    impl = _experts_impl(model, acc.device)

    student_identity = pair.checkpoint_identity(student.path)
    key = run_key(identity, student_identity, data.fingerprint, settings.key_fields(), int4, cache_info and k,
                  fresh and fresh.identity())  # fmt: skip
    run_dir = _run_dir(run_dir, key, teacher_path, student.path, main)
    acc.wait_for_everyone()

    # eval before (a fresh run; a resumed one has it in its checkpoint), on the plain modules
    evaluating = settings.eval_limit > 0
    suite, start_evals = None, {}
    if main and evaluating:
        suite = evaluation.suite_data(data_source, student.tokenizer, student.image_size, settings.eval_limit)
        if not (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
            start_evals["before"] = evaluation.score(
                model, student.tokenizer, suite, acc.device, student.image_size
            )
            say(f"eval before: {evaluation.line(start_evals['before'])}")
            if teacher_thinker is not None:
                start_evals["teacher_eval"] = evaluation.score(
                    teacher_thinker, student.tokenizer, suite, acc.device, student.image_size
                )
                say(f"eval teacher: {evaluation.line(start_evals['teacher_eval'])}")
    acc.wait_for_everyone()

    # train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    model, opt = acc.prepare(model, opt)
    plan = BatchPlan(data, plan_batch, settings.seed, acc.num_processes, settings.grad_accum)

    def evaluate(m: Any) -> dict[str, Any]:
        return evaluation.score(m, student.tokenizer, suite, acc.device, student.image_size)

    periodic = evaluate if (evaluating and not fsdp) else None  # FSDP: parameters are sharded mid-run
    trainer = Trainer(acc, model, opt, teacher_thinker, cache, data, plan, settings, student.tokenizer, run_dir, qat,
                      evaluate=periodic, progress=progress, fresh=fresh)  # fmt: skip
    resumed = trainer.resume()
    if not resumed:
        trainer.state.update(start_evals)
    say(f"training {what['trainable_params']:,} of {what['total_params']:,} parameters ({settings.train}), "
        f"global batch {plan.global_size()} = {acc.num_processes} process(es) x {settings.grad_accum} micro-batches")  # fmt: skip
    state = trainer.run()

    # the trained weights as a plain thinker (gathered under FSDP, adapters merged, no fake INT4)
    acc.wait_for_everyone()
    full_state = acc.get_state_dict(model) if fsdp else None  # every process takes part in the gather
    if main:
        if fsdp:
            thinker.load_state_dict(full_state)
            trained = thinker
        else:
            trained = trainable.merge_lora(acc.unwrap_model(model))
        if trained is not thinker_of(student.model):
            student.model.thinker = trained
        if qat:
            trainable.remove_fake_int4(trained)
        if encoder_attention != "sdpa":
            from omniedge.training.kernels import restore_encoder_attention

            restore_encoder_attention(trained)  # config.json must not name a kernel registered at run time
        record = {
            "teacher": {"path": str(teacher_path), "identity": identity},
            "student": {"path": str(student.path), "identity": student_identity, "recipe": student.meta.get("recipe")},
            "data": data.description | {"fingerprint": data.fingerprint, "fresh_speech": fresh and fresh.identity()},
            "settings": settings.to_dict(),
            "int4": {"mode": int4, "fake_quantized_weights": n_fake, "recipe": recipe},
            "trained": what,
            "teacher_logits": cache_info or {"on_the_fly": True, "top_k": settings.top_k},
            "run": {
                "steps": state["step"], "train_seconds": round(state["seconds"], 1), "processes": acc.num_processes,
                "distributed": str(acc.distributed_type), "device": str(acc.device),
                "gpu": torch.cuda.get_device_name(0) if acc.device.type == "cuda" else None,
                "precision": acc.mixed_precision, "experts_implementation": impl, "encoder_attention": encoder_attention,
                "resumed": resumed, **_versions(),
            },
            "curve": state["curve"],
            "evals": {"teacher": state.get("teacher_eval"), "before": state.get("before"), "during": state["evals"]},
        }  # fmt: skip
        meta = {
            "model": student.meta.get("model") or student.name,
            "made_by": "omniedge distill",
            "source": {"path": str(student.path), "files": student_identity},
            "recipe": student.meta.get("recipe"),
            "preprocess": student.meta.get("preprocess") or {"image_size": student.image_size},
            "distill": record,
        }
        dtype = getattr(torch, student.dtype, None)
        finish.write_outputs(student.model, student.tokenizer, out, int4=int4, recipe=recipe, meta=meta,
                             float_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                             scratch=run_dir, float_out=float_out, progress=progress)  # fmt: skip
        if evaluating:
            after = _eval_written(out, suite, acc.device, student.image_size)
            record["evals"]["after"] = after
            record["recovered_share"] = evaluation.recovered_share(
                state.get("teacher_eval"), state.get("before"), after
            )
            record["retention"] = evaluation.retention_of(state.get("teacher_eval"), after)
            if float_out is not None and int4 != "none":
                record["evals"]["after_float"] = _eval_written(
                    float_out, suite, acc.device, student.image_size
                )
            say(f"eval after ({out}): {evaluation.line(after)}")
            say(f"retention (student / teacher): {record['retention']}; share of the loss recovered: "
                f"{record['recovered_share']}")  # fmt: skip
        record["run"]["seconds_total"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(out / META_FILE, {**read_meta(out), "distill": record})
        _clean_run_dir(run_dir)
    acc.wait_for_everyone()
    acc.end_training()
    return out
