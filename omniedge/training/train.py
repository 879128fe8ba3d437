"""Train omni-mini from scratch on a pack, in phases that can stop and go on across device calls.

    python -m omniedge.training.train pack DATASET_DIR PACK_DIR        # here, on the CPU machine
    python -m omniedge.training.train train PACK_DIR -o OUT --device cuda --state STATE --deadline 540

Phases (TrainConfig.phases, default_phases()): `encoder` trains the audio encoder alone with a CTC loss
(omniedge.training.losses) on fresh synthetic speech, from random words towards sentences; `joint`
trains everything on one mixed batch per step (text, image, speech, spoken questions): the mean of the
per-task answer losses + router_aux_loss_coef x the Switch load-balancing loss + ctc_weight x CTC. Each
phase runs for `steps`, or for `seconds` of training measured over its steps 20-60 and then fixed as a
step count (recorded, so --encoder-steps/--joint-steps reproduce the run with the same seed).

With --state, the run stops before --deadline seconds (counted from this command's start), writes its
state there and exits with status 3; the same command continues it. Exit status 0: the model is in OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.outputs import CHECKPOINT, check_replaceable
from omniedge.training.batches import ChatTokens
from omniedge.training.loop import Run, run_phase
from omniedge.training.pack import SYNTHESISED, load_pack_examples, read_pack_meta, write_pack
from omniedge.training.save import save_trained
from omniedge.training.state import DivergenceGuard, RunState, load_state, save_state, settings_differ
from omniedge.training.stream import TRAIN_TASKS
from omniedge.training.synth import check_mixed_kind_weight

PAUSED = 3  # exit status: stopped before the deadline, state saved; run the same command again
__all__ = ["DivergenceGuard", "Phase", "TrainConfig", "default_phases", "main", "train"]


@dataclass
class Phase:
    """One stage of training with its own batches, schedule (warmup + cosine) and losses."""

    name: str
    batch: dict[str, int]
    seconds: float = 0.0  # training time, when `steps` is None
    steps: int | None = None
    lr: float = 2e-3
    warmup_steps: int = 150
    ctc_weight: float = 0.3
    lm: bool = True  # False: the audio encoder and the CTC head alone
    words_fraction: tuple[float, float] = (0.1, 0.1)  # random-word utterances, share at start -> end
    curriculum_steps: int = 1000


def default_phases() -> list[Phase]:
    """The shipped model's plan: ~2.5 min of encoder pre-training, ~13 min of joint training (one H200)."""
    return [
        Phase("encoder", {"speech": 224, "mixed": 32}, seconds=150, lr=3e-3, warmup_steps=100,
              ctc_weight=1.0, lm=False, words_fraction=(0.6, 0.15), curriculum_steps=400),
        Phase("joint", {"text": 32, "image": 128, "speech": 96, "mixed": 32}, seconds=780, lr=2e-3,
              warmup_steps=150, ctc_weight=0.3, words_fraction=(0.15, 0.1), curriculum_steps=1000),
    ]  # fmt: skip


@dataclass
class TrainConfig:
    """Everything that decides the result; stored in omniedge.json (and in a run state)."""

    seed: int = 0
    phases: list[Phase] = field(default_factory=default_phases)
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
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
    val_every: int = 500
    val_examples: int = 128  # per task, for the periodic validation
    loader_workers: int = 4  # batch-making processes (part of the seed -> batches mapping)
    final_eval: bool = True  # score the val split (accuracy, WER, perplexity) after training, if time allows
    init: str | None = None  # start from this checkpoint's weights, not from scratch
    mixed_kinds: dict[str, float] | None = (
        None  # spoken-question kinds: sampling weights (None: uniform rows)
    )
    audio_encoder: dict[str, Any] | None = None  # audio-encoder config overrides (CPU tests: a smaller one)


# Settings that do not change the weights: a resumed run may differ in them.
NOT_RESULT = ("val_every", "val_examples", "final_eval")


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


def _load_data(pack: Path, cfg: TrainConfig, tok: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(train examples, val examples, SpeechMaker or None) of a pack."""
    from omniedge.training.synth import SpeechMaker, ctc_target, read_speech_texts

    t0 = time.perf_counter()
    train_data = {t: load_pack_examples(pack, t, "train", dither_seed=cfg.seed) for t in TRAIN_TASKS}
    for i, ex in enumerate(train_data["speech"]):  # packed training audio (older packs): CTC hears it too
        train_data["speech"][i] = replace(ex, spoken=ctc_target(tok, ex.reference))
    val_data = {t: load_pack_examples(pack, t, "val") for t in TRAIN_TASKS}
    sentences, words, held_out = read_speech_texts(pack)
    maker = (
        SpeechMaker(tok, sentences, words, held_out, train_data["image"], cfg.mixed_kinds)
        if sentences
        else None
    )
    train_data = {t: v for t, v in train_data.items() if v}
    if not train_data:
        raise OmniedgeError(f"{pack} holds no training examples", "re-make the pack from a built dataset")
    print(
        f"loaded pack in {time.perf_counter() - t0:.1f}s: "
        + ", ".join(f"{t}={len(v)}" for t, v in train_data.items())
        + (f", speech synthesised from {len(sentences)} sentences" if maker else ""),
        flush=True,
    )
    return train_data, {t: v for t, v in val_data.items() if v}, maker


def train(
    pack: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    device_name: str = "cuda",
    state_dir: str | Path | None = None,
    deadline_s: float | None = None,
    stop_after: int | None = None,
) -> Path | None:
    """Train omni-mini on a pack; the checkpoint (bf16 weights) goes to `out`, which is returned.

    With `state_dir`, a run continues from the state there, and when `deadline_s` (seconds from now) would
    be passed, or it has taken `stop_after` steps, it saves its state and returns None instead.
    """
    import torch
    from tokenizers import Tokenizer

    from omniedge.models.omni_mini import build_omni_mini
    from omniedge.training.losses import make_ctc_head

    started = time.perf_counter()
    pack = Path(pack)
    meta = read_pack_meta(pack)
    check_replaceable(out, CHECKPOINT)  # now, not after the training
    if (deadline_s is not None or stop_after is not None) and state_dir is None:
        raise OmniedgeError("--deadline needs --state (where the run is saved to go on)", "add --state DIR")
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OmniedgeError("--device cuda asked for, but torch sees no CUDA GPU", "pass --device cpu")
    loaded = load_state(state_dir) if state_dir else None
    if loaded is None:
        state = RunState(asdict(cfg), totals=[p.steps for p in cfg.phases], seconds=[0.0] * len(cfg.phases))
        tensors: dict[str, Any] = {}
    else:
        state, tensors = loaded
        differ = settings_differ(state.settings, asdict(cfg), NOT_RESULT)
        if differ:
            raise OmniedgeError(
                f"{state_dir} holds a run started with other settings ({', '.join(differ)})",
                "repeat that run's command, or pass a new --state directory",
            )
        print(f"resuming at phase {cfg.phases[state.phase].name if state.phase < len(cfg.phases) else 'end'}"
              f" step {state.step}", flush=True)  # fmt: skip
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    tok = Tokenizer.from_file(str(pack / "tokenizer.json"))
    ct = ChatTokens.from_tokenizer(tok)
    train_data, val_data, maker = _load_data(pack, cfg, tok)
    if device.type == "cuda":
        # cuDNN's SDPA builds a new plan for every new sequence length (~10 ms of CPU per call, seen in a
        # profile here); the encoders' lengths change every step, so use the flash/efficient kernels.
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = _load_init(cfg.init, pack) if cfg.init else build_omni_mini(tok, cfg.seed, cfg.audio_encoder)
    model.config.thinker_config.text_config.router_aux_loss_coef = cfg.router_aux_loss_coef
    head = make_ctc_head(model)
    if tensors:
        model.load_state_dict(tensors["model"])
        head.load_state_dict(tensors["ctc"])
    model.to(device).train()
    head.to(device).train()
    deadline = started + deadline_s if deadline_s is not None else None
    run = Run(cfg, model, head, tok, ct, train_data, val_data, maker, device, deadline, stop_after)
    opt_state = tensors.get("opt")
    while state.phase < len(cfg.phases):
        if stop_after is not None and run.steps_taken >= stop_after:
            finished, opt = False, None  # paused between phases: the next starts afresh
        else:
            finished, opt = run_phase(run, state, opt_state)
        opt_state = None
        if not finished:
            assert state_dir is not None
            save_state(state_dir, state, _tensors(model, head, opt))
            phase = cfg.phases[state.phase]
            print(f"paused in phase {phase.name} at step {state.step}/{state.totals[state.phase] or '?'}; "
                  f"state in {state_dir}: run the same command again to go on", flush=True)  # fmt: skip
            return None
        state.phase, state.step = state.phase + 1, 0
        if state_dir is not None:
            save_state(state_dir, state, _tensors(model, head, None))
    return save_trained(run, state, pack, meta, Path(out))


def _tensors(model: Any, head: Any, opt: Any) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "ctc": head.state_dict(),
        **({"opt": opt.state_dict()} if opt is not None else {}),
    }


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
    k.add_argument(
        "--train-audio",
        action="store_true",
        help=f"pack the training audio of {', '.join(SYNTHESISED)} instead of the texts to synthesise",
    )
    t = sub.add_parser("train", help="train omni-mini on a pack")
    t.add_argument("pack", type=Path)
    t.add_argument("-o", "--out", type=Path, required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--state", type=Path, help="run state directory: continue from it, save to it")
    t.add_argument("--deadline", type=float, help="seconds: stop before then and save --state (exit 3)")
    t.add_argument("--encoder-seconds", type=float, default=150.0, help="encoder phase training time")
    t.add_argument("--encoder-steps", type=int, help="encoder phase steps (instead of --encoder-seconds)")
    t.add_argument("--joint-seconds", type=float, default=780.0, help="joint phase training time")
    t.add_argument("--joint-steps", type=int, help="joint phase steps (instead of --joint-seconds)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the joint phase")
    t.add_argument("--ctc-weight", type=float, default=0.3, help="CTC loss weight in the joint phase")
    t.add_argument("--batch", type=json.loads, help='joint batch per task, JSON: {"text": 32, ...}')
    t.add_argument("--encoder-batch", type=json.loads, help='encoder batch, JSON: {"speech": 224, ...}')
    t.add_argument("--experts-impl", default="auto", help="auto | eager | grouped_mm | batched_mm")
    t.add_argument("--val-every", type=int, default=500)
    t.add_argument("--val-examples", type=int, default=128, help="per task, for the periodic validation")
    t.add_argument("--no-final-eval", action="store_true", help="skip scoring the val split after training")
    t.add_argument(
        "--mixed-kinds",
        type=json.loads,
        help='sampling weight per spoken-question kind, JSON: {"where": 3} (others 1; default: as the pack has them)',
    )
    t.add_argument("--init", help="start from this checkpoint's weights (fresh optimizers and schedules)")
    t.add_argument("--loader-workers", type=int, default=4, help="batch-making processes")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    encoder, joint = default_phases()
    encoder = replace(encoder, seconds=args.encoder_seconds, steps=args.encoder_steps)
    joint = replace(
        joint, seconds=args.joint_seconds, steps=args.joint_steps, lr=args.lr, ctc_weight=args.ctc_weight
    )
    if args.batch:
        joint.batch = {**joint.batch, **args.batch}
    if args.encoder_batch:
        encoder.batch = dict(args.encoder_batch)
    phases = [p for p in (encoder, joint) if p.steps != 0 and (p.steps or p.seconds > 0)]
    if not phases:
        raise OmniedgeError("no phase to train (both have 0 steps or seconds)", "give a phase time or steps")
    return TrainConfig(
        seed=args.seed,
        phases=phases,
        experts_implementation=args.experts_impl,
        val_every=args.val_every,
        val_examples=args.val_examples,
        final_eval=not args.no_final_eval,
        init=args.init,
        mixed_kinds=check_mixed_kind_weight(args.mixed_kinds) if args.mixed_kinds else None,
        loader_workers=args.loader_workers,
    )


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
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
                speech_texts=not args.train_audio,
            )
            m = read_pack_meta(args.out)
            print(json.dumps({"counts": m["counts"], "speech_texts": m.get("speech_texts")}))
        else:
            left = None if args.deadline is None else args.deadline - (time.perf_counter() - started)
            done = train(args.pack, args.out, config_from_args(args), args.device, args.state, left)
            if done is None:
                return PAUSED
    except OmniedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
