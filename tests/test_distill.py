"""Knowledge distillation (omniedge.distill) on the tiny model and a toy dataset of every task, on the CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from omniedge.errors import OmniedgeError

torch = pytest.importorskip("torch")

TOY_BATCH = '{"text": 4, "image": 2, "speech": 2, "mixed": 2}'


def toy_dataset(root: Path, n: int = 6) -> Path:
    """n rows of every task (text, image, speech, mixed), train and test splits, omniedge.data's layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    (root / "wav").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        t = np.arange(16000 * (i % 3 + 1) // 2) / 16000
        x = (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t) * 32767).astype(np.int16)
        with wave.open(str(root / "wav" / f"{i}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(x.tobytes())
    words = ["the", "robot", "sees", "a", "red", "circle", "and", "blue", "square", "on", "table"]
    rows = {
        "text": [{"text": " ".join(rng.choice(words, 20 + 3 * i))} for i in range(n)],
        "image": [{"image": f"img/{i}.png", "prompt": "how many shapes?", "answer": ["one", "two"][i % 2], "task": "count"} for i in range(n)],
        "speech": [{"audio": f"wav/{i}.wav", "text": "a red circle", "voice": f"v{i}"} for i in range(n)],
        "mixed": [{"image": f"img/{i}.png", "audio": f"wav/{i}.wav", "prompt": "answer.", "answer": "top left", "task": "where"} for i in range(n)],
    }  # fmt: skip
    for task, rs in rows.items():
        (root / task).mkdir()
        for split in ("train", "test"):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_dataset(tmp_path_factory.mktemp("distill") / "ds")


def _pruned_tiny(out: Path, keep_ratio: float) -> Path:
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import apply_overrides, default_recipe
    from omniedge.models.registry import resolve_checkpoint

    recipe = apply_overrides(default_recipe(), keep_ratio=keep_ratio, quantize=False, samples=8)
    return compress(resolve_checkpoint("tiny"), out, recipe, progress=False)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a quarter of its experts kept (float): a student far enough from its teacher."""
    return _pruned_tiny(tmp_path_factory.mktemp("distill") / "student", 0.25)


def _cli(*args: str) -> int:
    from omniedge.cli import main

    return main([str(a) for a in args])


def _toy_args(data: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--batch",
        TOY_BATCH,
        "--eval-limit",
        "0",
        "--warmup",
        "0",
        "--quiet",
        *extra,
    ]


# ---------------------------------------------------------------- the loss


def test_loss_equals_a_hand_computation() -> None:
    from omniedge.distill.loss import LossWeights, TeacherTargets, distill_loss, rows_at, topk_targets

    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(2, 5, 7, generator=g)
    t_logits = torch.randn(2, 5, 7, generator=g) * 2
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, 2, 5, -100, -100]])
    s_rows, targets = rows_at(s_logits, labels)
    t_rows, _ = rows_at(t_logits, labels)
    # positions (row, t) predicting a labelled token t+1, in order: (0,1) (0,2) (0,3) (1,0) (1,1)
    want_pos = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert targets.tolist() == [3, 1, 6, 2, 5]
    assert torch.equal(s_rows, torch.stack([s_logits[b, t] for b, t in want_pos]))

    def softmax(z: list[float], temp: float) -> list[float]:
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    T, ce_sum, kl_sum = 2.0, 0.0, 0.0
    for (b, t), y in zip(want_pos, targets.tolist(), strict=True):
        zs, zt = s_logits[b, t].tolist(), t_logits[b, t].tolist()
        ce_sum += -math.log(softmax(zs, 1.0)[y])
        p, q = softmax(zt, T), softmax(zs, T)
        kl_sum += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    hand = (0.7 * ce_sum + 0.3 * T**2 * kl_sum) / 5
    w = LossWeights()  # the article's defaults
    assert (w.temperature, w.ce, w.kl) == (2.0, 0.7, 0.3)
    loss, sums = distill_loss(s_rows, targets, TeacherTargets(t_rows), w, normalizer=5)
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    assert float(sums["kl"]) == pytest.approx(kl_sum, rel=1e-5) and sums["tokens"] == 5
    # k = vocabulary is the exact KL; logit-only keeps the KL term alone
    assert float(distill_loss(s_rows, targets, topk_targets(t_rows, 7), w, 5)[0]) == pytest.approx(
        hand, rel=1e-5
    )
    lo, _ = distill_loss(s_rows, targets, TeacherTargets(t_rows), LossWeights.logit_only(), normalizer=5)
    assert float(lo) == pytest.approx(T**2 * kl_sum / 5, rel=1e-5)
    # top-2: the teacher renormalised over its two largest logits, the student's full softmax
    top = topk_targets(t_rows, 2)
    kl2 = 0.0
    for r, (b, t) in enumerate(want_pos):
        zt = t_logits[b, t].tolist()
        idx = sorted(range(7), key=lambda i: -zt[i])[:2]
        assert sorted(top.indices[r].tolist()) == sorted(idx)
        p, q = softmax([zt[i] for i in idx], T), softmax(s_logits[b, t].tolist(), T)
        kl2 += sum(pi * (math.log(pi) - math.log(q[i])) for pi, i in zip(p, idx, strict=True))
    _, sums2 = distill_loss(s_rows, targets, top, w, normalizer=5)
    assert float(sums2["kl"]) == pytest.approx(kl2, rel=1e-5) and kl2 > 0
    with pytest.raises(OmniedgeError, match="temperature"):
        LossWeights(temperature=0)
    with pytest.raises(OmniedgeError, match="not both 0"):
        LossWeights(ce=0, kl=0)


# ---------------------------------------------------------------- data and batch plan


def test_batch_plan_splits_the_global_batch_the_same_way_for_any_process_count(toy: Path) -> None:
    from omniedge.distill.data import BatchPlan, load_data
    from omniedge.models.tiny import build_tiny

    _, tok = build_tiny()
    data = load_data(toy, "train", tok, 64)
    assert data.modalities == {"text", "image", "audio"}
    batch = {"text": 4, "image": 2, "speech": 2, "mixed": 2}
    one = BatchPlan(data, batch, seed=0, world=1, accum=2)
    two = [BatchPlan(data, batch, seed=0, world=2, accum=1) for _ in range(2)]
    for step in range(5):
        g = one.global_indices(step)
        assert len(g) == 10 and [data.examples[i].task for i in g].count("text") == 4
        assert one.micro_batches(step, 0) == [
            two[0].micro_batches(step, 0)[0],
            two[1].micro_batches(step, 1)[0],
        ]
        assert sorted(i for mb in one.micro_batches(step, 0) for i in mb) == sorted(g)
        assert one.step_tokens(step) == int(data.counts[g].sum())
    # every example once per epoch of its task (6 text examples: steps 0-2 hold 12 = two epochs)
    texts = [i for s in range(3) for i in one.global_indices(s) if data.examples[i].task == "text"]
    assert sorted(texts[:6]) == sorted(texts[6:]) == data.by_task["text"]
    assert BatchPlan(data, batch, 1, 1, 1).global_indices(0) != one.global_indices(0)  # the seed matters
    with pytest.raises(OmniedgeError, match="cannot feed"):
        BatchPlan(data, {"text": 1}, 0, world=2, accum=1)


def test_settings_validate_and_read_a_recipe_stage() -> None:
    from omniedge.distill.settings import DistillSettings

    s = DistillSettings.from_mapping({"steps": 10, "batch": {"text": 8}, "temperature": 1.0})
    assert s.batch["text"] == 8 and s.batch["image"] == 128 and s.steps == 10
    with pytest.raises(OmniedgeError, match="unknown field"):
        DistillSettings.from_mapping({"stpes": 10})
    with pytest.raises(OmniedgeError, match="not supported"):
        DistillSettings(train="everything")
    with pytest.raises(OmniedgeError, match="LoRA with quantization-aware"):
        DistillSettings(train="lora", int4="qat")
    with pytest.raises(OmniedgeError, match="unknown task"):
        DistillSettings(batch={"video": 3})


def test_a_time_budget_is_decided_at_10_steps_then_again_until_three_quarters_done() -> None:
    """Steps slow at first (workers warming up) must not cut the run short: the count decided from the
    first 10 steps is decided again every 50 from the last 50, so the run ends at its budget; after three
    quarters of the steps it no longer moves; a fixed --steps is never changed."""
    from types import SimpleNamespace

    from omniedge.distill.loop import Trainer
    from omniedge.distill.settings import DistillSettings

    def trainer(steps: int | None) -> SimpleNamespace:
        acc = SimpleNamespace(num_processes=1, is_main_process=True)
        s = DistillSettings(time_budget_s=100.0, steps=steps)
        return SimpleNamespace(
            s=s, acc=acc, progress=False, state={"total": steps, "step": 0, "seconds": 0.0}
        )

    def run(t: SimpleNamespace, seconds_per_step: Callable[[int], float]) -> list[int]:
        durations: list[float] = []
        decided: list[int] = []
        while t.state["total"] is None or t.state["step"] < t.state["total"]:
            durations.append(seconds_per_step(len(durations)))
            t.state["step"], t.state["seconds"] = len(durations), sum(durations)
            Trainer._decide_total(t, durations)  # type: ignore[arg-type]
            decided.append(t.state["total"])
        return decided

    t = trainer(None)
    decided = run(t, lambda i: 0.5 if i < 60 else 0.25)  # the first 60 steps twice as slow
    assert decided[9] == 10 + int((100 - 5.0) / 0.5)  # 200 from the slow start
    assert decided[-1] > decided[9] and 99.0 <= t.state["seconds"] <= 100.0  # the budget used, not 2/3 of it
    late = trainer(None)
    decided = run(late, lambda i: 0.25 if i < 300 else 0.5)  # slower only in the last quarter
    assert decided[-1] == decided[299] and late.state["seconds"] > 100.0  # not decided again that late

    fixed = trainer(25)
    for i in range(60):
        Trainer._decide_total(fixed, [0.5] * (i + 1))  # type: ignore[arg-type]
    assert fixed.state["total"] == 25


# ---------------------------------------------------------------- the teacher cache


def test_teacher_cache_round_trips_and_refuses_other_data_or_teacher(
    toy: Path, student: Path, tmp_path: Path
) -> None:
    from omniedge.distill import pair
    from omniedge.distill import teacher_cache as tc
    from omniedge.distill.data import load_data
    from omniedge.distill.loss import rows_at
    from omniedge.models.family import thinker_of
    from omniedge.training.batches import ChatTokens, collate

    teacher = pair.load("tiny")
    th = thinker_of(teacher.model)
    th.set_experts_implementation("eager")
    data = load_data(toy, "train", teacher.tokenizer, 64)
    ident = pair.checkpoint_identity(teacher.path)
    vocab = th.config.text_config.vocab_size
    cache = tmp_path / "cache"
    m = tc.open_cache(cache, teacher.path, ident, data, 8, vocab, shard_examples=10)
    m = tc.build(cache, m, th, teacher.tokenizer, data, device="cpu", autocast=lambda: torch.autocast("cpu", enabled=False), progress=False, batch_size=4)  # fmt: skip
    assert m["complete"] and [s["count"] for s in m["shards"]] == [10, 10, 4]
    assert 0 < m["mass_t2"] < m["mass_t1"] <= 1  # top-8 of a flat random teacher: more mass left out at T=2
    reader = tc.TeacherCache(cache, data, 8)
    ids = [17, 3, 11]  # across shards, out of order
    b = collate(ChatTokens.from_tokenizer(teacher.tokenizer), [data.examples[i] for i in ids], positions=True)
    labels = b.pop("labels")
    with torch.no_grad():
        rows, _ = rows_at(th(**b, use_cache=False).logits, labels)
    got = reader.targets(ids)
    want_v, want_i = torch.topk(rows, 8)
    assert torch.equal(got.indices, want_i)
    assert torch.allclose(got.values, want_v - want_v[:, :1], atol=2e-3)  # float16, shifted by the row max
    assert torch.equal(
        tc.TeacherCache(cache, data, 3).targets(ids).indices, want_i[:, :3]
    )  # a smaller k: cut
    # refused: other data, another teacher, a larger k
    other = load_data(toy, "train", teacher.tokenizer, 64, limit=5)
    with pytest.raises(OmniedgeError, match="made from other data"):
        tc.open_cache(cache, teacher.path, ident, other, 8, vocab)
    with pytest.raises(OmniedgeError, match="another teacher"):
        tc.open_cache(cache, student, pair.checkpoint_identity(student), data, 8, vocab)
    with pytest.raises(OmniedgeError, match="top 8 logits per position; this run asks for 16"):
        tc.open_cache(cache, teacher.path, ident, data, 16, vocab)
    # and through the command: one clear error, exit code 2
    out = tmp_path / "kd"
    args = [
        "distill",
        "tiny",
        student,
        "-o",
        out,
        *_toy_args(toy, "--limit", "5", "--teacher-cache", cache, "--top-k", "8"),
    ]
    assert _cli(*args, "--steps", "1") == 2
    assert not out.exists()


# ---------------------------------------------------------------- training


def _heldout_kl(teacher: Path | str, student: Path, data_dir: Path) -> float:
    """Mean KL(teacher || student) at T = 1 over every predicted position of the toy data."""
    from omniedge.checkpoint import load_checkpoint
    from omniedge.distill.data import load_data
    from omniedge.distill.loss import TeacherTargets, kl_per_token, rows_at
    from omniedge.models.family import thinker_of
    from omniedge.models.registry import resolve_checkpoint
    from omniedge.training.batches import ChatTokens, collate

    t, tok = load_checkpoint(resolve_checkpoint(str(teacher)))
    s, _ = load_checkpoint(student)
    for m in (t, s):
        m.set_experts_implementation("eager")
    data = load_data(data_dir, "train", tok, 64)
    b = collate(ChatTokens.from_tokenizer(tok), data.examples, positions=True)
    labels = b.pop("labels")
    with torch.no_grad():
        tr, _ = rows_at(thinker_of(t)(**b, use_cache=False).logits, labels)
        sr, _ = rows_at(thinker_of(s)(**b, use_cache=False).logits, labels)
    return float(kl_per_token(sr, TeacherTargets(tr), 1.0).mean())


def test_distillation_lowers_the_kl_of_a_pruned_tiny_student(
    toy: Path, student: Path, tmp_path: Path
) -> None:
    out = tmp_path / "kd"
    rc = _cli("distill", "tiny", student, "-o", out, *_toy_args(toy, "--logit-only", "--steps", "12", "--lr", "1e-4", "--temperature", "1"))  # fmt: skip
    assert rc == 0
    before, after = _heldout_kl("tiny", student, toy), _heldout_kl("tiny", out, toy)
    assert after < 0.7 * before, (before, after)
    meta = json.loads((out / "omniedge.json").read_text())
    d = meta["distill"]
    assert meta["made_by"] == "omniedge distill" and d["run"]["steps"] == 12 and d["int4"]["mode"] == "none"
    assert d["curve"][-1]["kl"] < d["curve"][0]["kl"]
    assert {"examples_per_s", "tokens_per_s", "lr"} <= set(d["curve"][0])
    assert json.loads((out / "config.json").read_text())["thinker_config"]["text_config"]["num_experts"] == 2


def test_a_killed_run_resumes_to_the_same_end_state(toy: Path, student: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    args = [
        "distill",
        "tiny",
        str(student),
        *_toy_args(toy, "--steps", "8", "--save-every", "2", "--log-every", "3", "--lr", "1e-3"),
    ]
    assert _cli(*args, "-o", tmp_path / "straight", "--run-dir", tmp_path / "run-a") == 0
    run = tmp_path / "run-b"
    cmd = [sys.executable, "-m", "omniedge", *args, "-o", str(tmp_path / "resumed"), "--run-dir", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # mid-way: no chance to clean up
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 8 and not (tmp_path / "resumed").exists()
    assert _cli(*args, "-o", tmp_path / "resumed", "--run-dir", run) == 0
    a, b = (
        load_file(tmp_path / "straight" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5
    da = json.loads((tmp_path / "straight" / "omniedge.json").read_text())["distill"]
    db = json.loads((tmp_path / "resumed" / "omniedge.json").read_text())["distill"]
    assert db["run"]["resumed"] and not da["run"]["resumed"]
    assert [round(c["loss"], 5) for c in da["curve"]] == [round(c["loss"], 5) for c in db["curve"]]
    assert not run.exists()  # a completed run removes its checkpoint


def test_what_to_train_experts_or_lora(toy: Path, student: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    before = load_file(student / "model.safetensors")

    def changed(out: Path) -> set[str]:
        after = load_file(out / "model.safetensors")
        return {k for k in before if not torch.equal(before[k], after[k])}

    assert _cli("distill", "tiny", student, "-o", tmp_path / "e", "--train", "experts", *_toy_args(toy, "--steps", "2", "--lr", "1e-2")) == 0  # fmt: skip
    names = changed(tmp_path / "e")
    assert names and all(".mlp.experts." in n or ".mlp.gate." in n for n in names)
    assert _cli("distill", "tiny", student, "-o", tmp_path / "l", "--train", "lora", *_toy_args(toy, "--steps", "2", "--lr", "1e-2")) == 0  # fmt: skip
    names = changed(tmp_path / "l")  # adapters merged: the ordinary layout, attention and experts changed
    assert any("self_attn.q_proj" in n for n in names) and any(".mlp.experts." in n for n in names)
    assert all("lora" not in n for n in load_file(tmp_path / "l" / "model.safetensors"))
    assert all(n.startswith("thinker.model.layers.") for n in names)


def test_int4_finish_is_the_fake_quantized_model_the_student_trained_through(
    student: Path, tmp_path: Path
) -> None:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.pipeline import compress
    from omniedge.distill import finish, pair, trainable
    from omniedge.models.family import thinker_of

    s = pair.load(student)
    recipe = finish.quantize_recipe(s, None)
    q = finish.quantize_settings(recipe)
    recipe["calibration"]["samples"] = 4
    th = thinker_of(s.model)
    th.set_experts_implementation("eager")
    n = trainable.add_fake_int4(th, list(q["targets"]), int(q["group_size"]))
    assert n == 2 * (4 + 2)  # per layer: q, k, v, o and the two fused expert tensors
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = th(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        w = th.model.language_model.layers[0].self_attn.q_proj.weight
        g = torch.autograd.functional.vjp(
            lambda x: trainable._fake_int4_module(128)(x), w, torch.ones_like(w)
        )[1]
    assert torch.equal(g, torch.ones_like(w))  # straight-through
    trainable.remove_fake_int4(th)
    finish.save_float(s.model, s.tokenizer, tmp_path / "float", {"model": "tiny"}, torch.float32)
    compress(tmp_path / "float", tmp_path / "int4", recipe, progress=False)
    m, _ = load_checkpoint(tmp_path / "int4")
    m.set_experts_implementation("eager")
    with torch.no_grad():
        real = thinker_of(m)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    assert float((real - fake).abs().max()) < 1e-4 * float(fake.abs().max())


def test_int4_modes_through_the_command(toy: Path, student: Path, tmp_path: Path) -> None:
    out, flo = tmp_path / "q", tmp_path / "f"
    args = _toy_args(toy, "--steps", "2", "--int4", "qat", "--float-out", str(flo))
    assert _cli("distill", "tiny", student, "-o", out, *args) == 0
    cfg = json.loads((out / "config.json").read_text())
    meta = json.loads((out / "omniedge.json").read_text())
    assert cfg["omniedge_quantization"]["method"] == "rtn" and (out / "int4.safetensors").is_file()
    assert (
        meta["distill"]["int4"]["mode"] == "qat" and meta["distill"]["int4"]["fake_quantized_weights"] == 12
    )
    assert meta["stages"][0]["name"] == "quantize"  # the compress stage wrote it
    assert "omniedge_quantization" not in json.loads((flo / "config.json").read_text())


# ---------------------------------------------------------------- clear errors


def test_clear_errors(toy: Path, student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omniedge.checkpoint import save_checkpoint
    from omniedge.models.tiny import build_tiny

    out = tmp_path / "kd"
    # different vocabularies: omni-mini (3,584 tokens) teaching the tiny model
    assert _cli("distill", "omni-mini", student, "-o", out, *_toy_args(toy, "--steps", "1")) == 2
    assert "different vocabularies" in capsys.readouterr().err
    # different image inputs: a student whose vision encoder takes 32 px patches
    model, tok = build_tiny()
    from transformers import Qwen3OmniMoeForConditionalGeneration

    cfg = model.config
    cfg.thinker_config.vision_config.patch_size = 32
    odd = save_checkpoint(Qwen3OmniMoeForConditionalGeneration(cfg), tok, tmp_path / "odd", {"model": "odd"})
    assert _cli("distill", "tiny", odd, "-o", out, *_toy_args(toy, "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "read image inputs differently (patch_size 16 (teacher) vs 32 (student))" in err
    # ... which text-only data does not care about
    assert _cli("distill", "tiny", odd, "-o", out, *_toy_args(toy, "--steps", "1"), "--batch", '{"text": 4, "image": 0, "speech": 2, "mixed": 0}') == 0  # fmt: skip
    if not torch.cuda.is_available():
        assert (
            _cli("distill", "tiny", student, "-o", tmp_path / "g", "--device", "cuda", *_toy_args(toy)) == 2
        )
        assert "--device cuda asked for, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- data parallel (issue 13's code path, on CPUs)


def test_two_processes_match_one_at_the_same_global_batch(toy: Path, student: Path, tmp_path: Path) -> None:
    """`accelerate launch` with 2 processes (gloo on the CPU; NCCL on GPUs, same code) against 1 process
    with 2 accumulation steps: same global batch, so the same loss curve and the same weights."""
    from safetensors.torch import load_file

    args = [
        "distill",
        "tiny",
        str(student),
        *_toy_args(toy, "--steps", "4", "--log-every", "1", "--lr", "1e-3"),
    ]
    assert _cli(*args, "-o", tmp_path / "one", "--grad-accum", "2") == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]  # fmt: skip
    run = subprocess.run([*launch, "-m", "omniedge", *args, "-o", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "omniedge.json").read_text())["distill"]
    two = json.loads((tmp_path / "two" / "omniedge.json").read_text())["distill"]
    assert (one["run"]["processes"], two["run"]["processes"]) == (1, 2)
    for a, b in zip(one["curve"], two["curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["kl"] == pytest.approx(
            b["kl"], rel=1e-3, abs=1e-7
        )
    wa, wb = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) < 1e-5


# ---------------------------------------------------------------- the `distill` stage of compress recipes


def _kd_recipe(data: Path, **distill: object) -> dict[str, object]:
    stage = {"data": str(data), "batch": json.loads(TOY_BATCH), "steps": 3, "lr": 1e-3, "warmup_steps": 0,
             "eval_limit": 0, "save_every": 1, **distill}  # fmt: skip
    return {
        "stages": [{"prune": {"keep_ratio": 0.5}}, {"distill": stage}, {"quantize": {}}],
        "calibration": {"samples": 8},
    }


def test_a_recipe_prunes_distils_and_quantizes(toy: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import validate_recipe
    from omniedge.distill.recipe_stage import work_dir

    recipe = _kd_recipe(toy)
    out = compress("tiny", tmp_path / "kd", recipe, progress=False)
    plain = {**recipe, "stages": [recipe["stages"][0], recipe["stages"][2]]}  # type: ignore[index]
    ref = compress("tiny", tmp_path / "plain", plain, progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["thinker_config"]["text_config"]["num_experts"] == 4  # tiny's 8 experts, half kept
    assert cfg["omniedge_quantization"]["method"] == "rtn"
    assert meta["recipe"] == validate_recipe(recipe)  # the whole recipe, defaults filled
    assert [s["name"] for s in meta["stages"]] == ["prune", "distill", "quantize"]
    assert meta["distill"]["run"]["steps"] == 3 and meta["distill"]["int4"]["mode"] == "none"
    assert meta["distill"]["teacher"]["path"] == str(meta["source"]["path"])
    model, _ = load_checkpoint(out)  # loads as `omniedge eval` / export load it
    assert model.config.thinker_config.text_config.num_experts == 4
    a, b = load_file(out / "int4.safetensors"), load_file(ref / "int4.safetensors")
    assert a.keys() == b.keys()
    assert sum(not torch.equal(a[k], b[k]) for k in a) > len(a) // 2  # training changed the weights
    assert not work_dir(out).exists()  # the passes' work directory is removed on success


def test_distill_stage_errors(toy: Path, tmp_path: Path) -> None:
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import validate_recipe

    def err(recipe: dict[str, object]) -> str:
        with pytest.raises(OmniedgeError) as e:
            validate_recipe(recipe)
        return str(e.value)

    stages = _kd_recipe(toy)["stages"]
    prune, kd, quant = stages  # type: ignore[misc]
    assert "quantize must be the last stage" in err({"stages": [prune, quant, kd]})
    assert "distill must come after prune" in err({"stages": [kd, prune, quant]})
    assert "unknown field(s) ['colour']" in err(
        {"stages": [prune, {"distill": {**kd["distill"], "colour": 1}}]}
    )
    assert "distill.data: missing" in err({"stages": [prune, {"distill": {"steps": 2}}, quant]})
    assert "distill lr = -1 is not a positive number" in err(
        {"stages": [{"distill": {"data": "x", "lr": -1}}]}
    )
    assert "no quantize stage follows" in err({"stages": [prune, {"distill": {"data": "x", "int4": "qat"}}]})
    gptq = {"quantize": {"method": "gptq"}}
    assert "the quantize stage is gptq" in err(
        {"stages": [prune, {"distill": {"data": "x", "int4": "qat"}}, gptq]}
    )
    assert "'after' does not apply in a recipe" in err(
        {"stages": [{"distill": {"data": "x", "int4": "after"}}]}
    )
    # data that does not exist: one error before any compression, nothing written
    bad = {"stages": [prune, {"distill": {"data": str(tmp_path / "nowhere")}}, quant]}
    with pytest.raises(OmniedgeError, match="neither a training pack"):
        compress("tiny", tmp_path / "kd", bad, progress=False)
    assert not any(tmp_path.iterdir())
    # an unrelated directory is not replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OmniedgeError, match="refusing to replace"):
        compress("tiny", tmp_path / "mine", _kd_recipe(toy), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_killed_recipe_run_resumes_its_distillation(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from omniedge.compress.pipeline import compress
    from omniedge.distill.recipe_stage import work_dir

    recipe = _kd_recipe(toy, steps=8, save_every=2)
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "kd"
    cmd = [
        sys.executable,
        "-m",
        "omniedge",
        "compress",
        "tiny",
        "-o",
        str(out),
        "--recipe",
        str(tmp_path / "r.json"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = work_dir(out) / "run" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (work_dir(out) / "student" / "omniedge.json").is_file()
    assert _cli("compress", "tiny", "-o", out, "--recipe", tmp_path / "r.json") == 0
    assert "pass 1/3: the pruned student" in capsys.readouterr().out  # pass 1 was not run again
    meta = json.loads((out / "omniedge.json").read_text())
    assert meta["distill"]["run"]["resumed"] and meta["distill"]["run"]["steps"] == 8
    straight = compress("tiny", tmp_path / "straight", recipe, progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5
    assert not work_dir(out).exists()


def test_a_recipe_distils_through_the_quantize_stages_int4(toy: Path, tmp_path: Path) -> None:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.pipeline import compress

    out = compress("tiny", tmp_path / "qat", _kd_recipe(toy, steps=2, int4="qat"), progress=False)
    meta = json.loads((out / "omniedge.json").read_text())
    assert meta["distill"]["int4"]["mode"] == "qat" and meta["distill"]["int4"]["fake_quantized_weights"] > 0
    assert meta["distill"]["int4"]["recipe"]["stages"] == [meta["recipe"]["stages"][2]]  # the recipe's own
    assert [s["name"] for s in meta["stages"]] == ["prune", "distill", "quantize"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["omniedge_quantization"]["method"] == "rtn"
    assert cfg["thinker_config"]["text_config"]["num_experts"] == 4
    load_checkpoint(out)


# ---------------------------------------------------------------- speech synthesised afresh (--fresh-speech)

needs_espeak = pytest.mark.skipif(
    not __import__("omniedge.data.espeak", fromlist=["available"]).available(),
    reason="espeakng-loader is not installed",
)


@pytest.fixture(scope="module")
def speech_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training pack of the toy data set whose text has sentences to speak (as `train pack` makes it)."""
    from omniedge.models.tiny import build_tiny
    from omniedge.training.pack import write_pack

    root = toy_dataset(tmp_path_factory.mktemp("fresh") / "ds")
    said = ["the robot sees a red circle", "a blue square is on the table", "the table sees the robot",
            "a red square and a blue circle", "the robot is on the table", "a circle sees a square"]  # fmt: skip
    rows = [{"text": ". ".join(said[i:] + said[:i]) + "."} for i in range(6)]
    (root / "text" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, tok = build_tiny()
    return write_pack(root, root.parent / "pack", tok, image_size=64, splits=("train",), speech_texts=True)


@needs_espeak
def test_fresh_speech_depends_on_seed_step_and_position_only(speech_pack: Path) -> None:
    from tokenizers import Tokenizer

    from omniedge.distill.fresh import FreshSpeech
    from omniedge.training.pack import load_pack_examples

    tok = Tokenizer.from_file(str(speech_pack / "tokenizer.json"))
    scenes = load_pack_examples(speech_pack, "image", "train")
    per = {"speech": 3, "mixed": 2}
    one = FreshSpeech(speech_pack, tok, scenes, per, seed=0, world=1, accum=2)  # one process, 2 micro-batches
    two = [
        FreshSpeech(speech_pack, tok, scenes, per, seed=0, world=2, accum=1) for _ in range(2)
    ]  # two processes
    for step in (0, 5):
        a = one.micro_batch(step, 0, 0) + one.micro_batch(step, 0, 1)
        b = two[0].micro_batch(step, 0, 0) + two[1].micro_batch(step, 1, 0)
        assert len(a) == len(b) == 5 and [e.task for e in a].count("speech") == 3
        for x, y in zip(a, b, strict=True):  # the same audio whoever makes it
            assert x.reference == y.reference and np.array_equal(x.mel, y.mel)
        assert one.tokens(step) == sum(len(e.answer) + 1 for e in a)  # known before synthesis
        for e in a:
            assert e.mel is not None and e.mel.shape[0] == 128
            if e.task == "mixed":
                assert e.pixel_values is not None and e.kind in ("count", "colour", "shape", "where")
            else:
                assert e.reference in one.sentences and e.reference not in one.held_out
    s0 = {e.reference for e in one.micro_batch(0, 0, 0) if e.task == "speech"}
    s1 = {e.reference for e in one.micro_batch(1, 0, 0) if e.task == "speech"}
    assert s0 and (s0 != s1 or len(one.sentences) < 3)  # new picks each step


@needs_espeak
def test_fresh_speech_distils_and_refuses_a_cache_or_a_data_set(
    toy: Path, speech_pack: Path, student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kd"
    args = _toy_args(speech_pack, "--steps", "2", "--int4", "none", "--run-dir", str(tmp_path / "run"))
    assert _cli("distill", "tiny", student, "-o", out, *args, "--fresh-speech") == 0
    meta = json.loads((out / "omniedge.json").read_text())["distill"]
    fresh = meta["data"]["fresh_speech"]
    assert fresh["per_step"] == {"speech": 2, "mixed": 2} and fresh["sentences"] > 0
    assert set(meta["data"]["examples"]) == {"text", "image"}  # all audio in training was made afresh
    assert meta["curve"] and all(r["examples_per_step"] == 4 + 2 + 2 + 2 for r in meta["curve"])
    weighted = tmp_path / "kd-kinds"
    assert _cli("distill", "tiny", student, "-o", weighted, *args, "--fresh-speech", "--mixed-kinds",
                '{"count": 2}') == 0  # fmt: skip
    kinds = json.loads((weighted / "omniedge.json").read_text())["distill"]["data"]["fresh_speech"]
    assert kinds["mixed_kinds"] == {"count": 2.0}
    capsys.readouterr()
    cache = _cli("distill", "tiny", student, "-o", tmp_path / "c", *args, "--fresh-speech",
                 "--teacher-cache", tmp_path / "cache")  # fmt: skip
    assert cache == 2 and "cannot hold" in capsys.readouterr().err
    data_set = _cli(
        "distill", "tiny", student, "-o", tmp_path / "d", *_toy_args(toy, "--steps", "1"), "--fresh-speech"
    )
    assert data_set == 2 and "is a data set" in capsys.readouterr().err


@needs_espeak
def test_fresh_spoken_questions_follow_their_kind_weights(speech_pack: Path) -> None:
    """`--mixed-kinds`: the spoken questions made afresh are drawn by kind weight, as omni-mini's training
    draws them; unweighted picks stay what they were; weights without fresh speech are refused."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    from omniedge.distill.fresh import FreshSpeech
    from omniedge.distill.settings import DistillSettings
    from omniedge.errors import OmniedgeError
    from omniedge.training.pack import load_pack_examples

    tok = Tokenizer.from_file(str(speech_pack / "tokenizer.json"))
    scenes = load_pack_examples(speech_pack, "image", "train")  # the toy's questions are all "count"
    scenes = [replace(e, kind="where") if i % 3 == 0 else e for i, e in enumerate(scenes)]
    per = {"speech": 0, "mixed": 40}
    plain = FreshSpeech(speech_pack, tok, scenes, per, seed=0, world=1, accum=1)
    where = FreshSpeech(speech_pack, tok, scenes, per, seed=0, world=1, accum=1, mixed_kinds={"where": 50.0})
    kinds = [e.kind for e in plain.scenes]
    assert "where" in kinds and len(set(kinds)) > 1

    def share(f: FreshSpeech) -> float:
        picked = [f.scenes[i].kind for s in range(5) for _, i in f.picks(s)]
        return picked.count("where") / len(picked)

    assert share(where) > 0.8 > share(plain)
    assert where.identity()["mixed_kinds"] == {"where": 50.0} and plain.identity()["mixed_kinds"] is None
    with pytest.raises(OmniedgeError, match="fresh speech is off"):
        DistillSettings(mixed_kinds={"where": 2.0})
    with pytest.raises(OmniedgeError, match="not one of"):
        DistillSettings(fresh_speech=True, mixed_kinds={"why": 2.0})
    assert DistillSettings(fresh_speech=True, mixed_kinds={"where": 2}).mixed_kinds == {"where": 2.0}
