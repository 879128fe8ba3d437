"""One memory budget for every engine: readers, the plan, live eviction, measured footprints, the queue.

Everything runs the real omni-mini bundle on ONNX Runtime's CPU provider; memory is this process's RSS.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from omniedge.cli import main
from omniedge.errors import OmniedgeError
from omniedge.runtime.admission import AdmissionQueue, QueueFullError
from omniedge.runtime.app import Omni
from omniedge.runtime.footprints import FOOTPRINT_FILE, EngineCost
from omniedge.runtime.manifest import TensorSpec, load_manifest
from omniedge.runtime.memory import (
    RssMeter,
    parse_budget,
    parse_size,
    parse_tegrastats,
    read_meminfo,
    system_used_bytes,
)
from omniedge.runtime.plan import ENGINES, BudgetError, kv_bytes_per_token, plan_memory
from omniedge.runtime.preprocess import audio_chunks, log_mel
from omniedge.runtime.scheduler import run_size

MiB = 2**20


# ---------------------------------------------------------------- sizes and readers


def test_sizes_and_budgets_parse_as_documented() -> None:
    assert parse_size("6GB") == 6 * 10**9
    assert parse_size("6GiB") == parse_size("6G") == 6 * 2**30
    assert parse_size("512 MiB") == 512 * MiB
    assert parse_size(1234) == 1234
    assert parse_budget("50%", free_bytes=1000, in_use=10) == 510
    assert parse_budget("0.25", free_bytes=1000) == 250
    assert parse_budget("2GiB", free_bytes=1) == 2 * 2**30
    for bad in ("6XB", "lots", "0%", "150%", "0"):
        with pytest.raises(OmniedgeError):
            parse_budget(bad, free_bytes=1000)


def test_jetson_readers_parse_recorded_output() -> None:
    line = (
        "12-01-2026 10:00:00 RAM 2481/31002MB (lfb 2x4MB) SWAP 0/15501MB (cached 0MB) CPU [2%@729,1%@729] "
        "GR3D_FREQ 0% VDD_GPU_SOC 1200mW/1200mW VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 3000mW/3000mW"
    )
    assert parse_tegrastats(line) == (2481 * MiB, 31002 * MiB)
    assert parse_tegrastats("no memory here") is None
    info = read_meminfo(
        "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   12000000 kB\nHugePages_Total: 0\n"
    )
    assert info["MemTotal"] == 32000000 * 1024 and info["HugePages_Total"] == 0
    assert system_used_bytes(info) == 20000000 * 1024


def test_rss_meter_catches_a_peak_between_reads() -> None:
    meter = RssMeter()
    meter.reset_peak()
    before = meter.current()
    block = np.ones(64 * MiB // 8)  # touched: 64 MiB resident
    del block  # freed before the peak is read
    assert meter.peak() >= before + 60 * MiB
    assert meter.current() < before + 32 * MiB
    assert meter.lifetime_peak() >= before + 60 * MiB


# ---------------------------------------------------------------- the plan


def test_kv_bytes_per_token_follows_layers_heads_and_dtype(omni_mini_bundle: Path) -> None:
    m = load_manifest(omni_mini_bundle)
    t = m.text
    assert kv_bytes_per_token(m) == 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4  # float32 inputs
    thinker = m.components["thinker"]
    half = dataclasses.replace(
        thinker,
        inputs=tuple(
            TensorSpec(i.name, i.shape, "float16") if i.name.startswith("past_key_values.") else i
            for i in thinker.inputs
        ),
    )
    # The real thinker: 48 layers, 4 KV heads of 128, bf16/fp16 -> 96 KiB per token.
    real = dataclasses.replace(
        m,
        text=dataclasses.replace(t, num_layers=48, num_kv_heads=4, head_dim=128),
        components={**m.components, "thinker": half},
    )
    assert kv_bytes_per_token(real) == 96 * 1024


def _costs() -> dict[str, EngineCost]:
    def cost(load: int, run: int, per_token: float = 0.0) -> EngineCost:
        return EngineCost(load * MiB, load * MiB, run * MiB, run * MiB, per_token, measured=True)

    return {"thinker": cost(30, 10, 100 * 1024), "vision": cost(10, 5), "audio": cost(20, 30)}


def test_plan_sizes_the_context_from_what_the_budget_leaves(omni_mini_bundle: Path) -> None:
    m = load_manifest(omni_mini_bundle)
    base = 100 * MiB
    small = plan_memory(m, 300 * MiB, base, _costs())
    big = plan_memory(m, 400 * MiB, base, _costs())
    assert small.pinned == ("thinker",) and small.on_demand == ("vision", "audio")
    assert 256 <= small.max_context < big.max_context <= m.text.max_position_embeddings
    assert small.need(small.max_context) <= 300 * MiB < small.need(small.max_context + 1)
    huge = plan_memory(m, 8 * 2**30, base, _costs())
    assert huge.max_context == m.text.max_position_embeddings  # never past the model's own context
    text = "\n".join(small.describe())
    assert "thinker" in text and "on demand  vision" in text and f"{small.max_context} tokens" in text


def test_a_budget_too_small_is_refused_with_the_bytes_needed(omni_mini_bundle: Path) -> None:
    m = load_manifest(omni_mini_bundle)
    with pytest.raises(BudgetError) as e:
        plan_memory(m, 50 * MiB, 100 * MiB, _costs())
    needed = int(str(e.value).split("(")[1].split(" bytes")[0])
    assert plan_memory(m, needed, 100 * MiB, _costs()).max_context >= 256
    with pytest.raises(BudgetError, match="fits"):
        plan_memory(m, 300 * MiB, 100 * MiB, _costs(), max_context=2048)  # asked more than fits: say so


def test_a_runs_expected_cost_is_its_size_times_the_rate_of_long_runs() -> None:
    c = EngineCost.from_weights(10 * MiB)
    c.observe_run(400, grew=40 * MiB, retained=2 * MiB, short_below=64, rate_from=200)  # replaces estimates
    assert c.retained_bytes == 2 * MiB and c.run_bytes == 0  # what stayed is the engine's, not the run's
    assert c.expected_run(400) == 38 * MiB and c.expected_run(800) == 76 * MiB
    # A mid-size run does not set the rate: 3 MiB another thread allocated meanwhile would come out as
    # 30 KiB a token, 12 MiB more at 400 tokens.
    c.observe_run(100, grew=3 * MiB + 100 * 97 * 1024, retained=0, short_below=64, rate_from=200)
    assert c.expected_run(400) == 38 * MiB
    c.observe_run(1, grew=3 * MiB, retained=None, short_below=64, rate_from=200)  # a decode step
    assert c.expected_run(1) == 3 * MiB and c.expected_run(400) == 38 * MiB  # a short run's fixed cost
    c.observe_run(300, grew=1 * MiB, retained=0, short_below=64, rate_from=200)  # never lowers the rate
    assert c.expected_run(400) == 38 * MiB and c.largest_run == 400 and c.runs == 4


def test_the_least_budget_is_what_the_schedulers_arithmetic_needs(omni_mini_bundle: Path) -> None:
    m = load_manifest(omni_mini_bundle)
    assert m.audio is not None
    ctx, base = 512, 100 * MiB
    costs = {  # as omni-mini measures them: the audio encoder's run is the largest
        "thinker": EngineCost(17 * MiB, 20 * MiB, 0, 2 * MiB, 30 * 1024, measured=True),
        "vision": EngineCost(14 * MiB, 14 * MiB, 0, 0, 15 * 1024, measured=True),
        "audio": EngineCost(14 * MiB, 14 * MiB, 0, 1 * MiB, 130 * 1024, measured=True),
    }
    need = plan_memory(m, 8 * 2**30, base, costs, max_context=ctx).need(ctx)
    plan = plan_memory(m, need, base, costs, max_context=ctx)
    # The largest runs the plan covers are what preprocessing makes of the largest inputs the runtime takes.
    a = m.audio
    longest = audio_chunks(log_mel(np.zeros(int(a.max_seconds * a.sampling_rate), np.float32)), a.n_window)
    inputs = {"valid_indices": longest.valid_indices, "padded_features": longest.padded_features}
    assert plan.largest_run("audio", ctx) == run_size("audio", inputs) == longest.num_tokens
    assert plan.largest_run("thinker", ctx) == ctx
    # Every engine loads and runs its largest input beside the pinned ones in what the budget leaves to
    # engines: the check the scheduler makes before each run.
    for e in ENGINES:
        assert plan.engines_bytes(plan.pinned, e, plan.largest_run(e, ctx), ctx) <= plan.engine_room()
    # The encoders cannot both stay while the longest audio runs; a short one leaves room for both.
    assert plan.engines_bytes(ENGINES, "audio", longest.num_tokens, ctx, loading=False) > plan.engine_room()
    assert plan.engines_bytes(ENGINES, "audio", 26, ctx, loading=False) <= plan.engine_room()
    assert need < plan.all_resident_bytes(ctx)
    with pytest.raises(BudgetError, match="fits"):
        plan_memory(m, need - 1, base, costs, max_context=ctx)
    # Where runs keep what they grew (a GPU provider's arena), each engine is planned with its largest run.
    kept = plan_memory(m, 8 * 2**30, base, costs, max_context=ctx, arenas=True)
    for e in ENGINES:
        largest = kept.run_bytes(e, kept.largest_run(e, ctx))
        assert kept.resident_bytes(e, ctx) == plan.resident_bytes(e, ctx) - costs[e].retained_bytes + max(
            costs[e].retained_bytes, largest
        )
    assert kept.need(ctx) > need


def test_info_prints_the_plan_and_refuses_a_budget_below_the_smallest_engine(
    fresh_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(fresh_bundle), "--memory-budget", "2GiB"]) == 0
    out = capsys.readouterr().out
    assert "resident   thinker" in out and "on demand  vision" in out and "context" in out
    assert "runs       up to thinker 2048 tokens" in out and "audio 390 audio tokens" in out  # 30 s
    assert "not measured here yet" in out  # a fresh bundle: weight files until the first start
    smallest = min(load_manifest(fresh_bundle).components[n].weight_bytes for n in ("vision", "audio"))
    assert main(["info", str(fresh_bundle), "--memory-budget", str(smallest - 1)]) == 2
    err = capsys.readouterr().err
    assert "is below the" in err and "fix: give --memory-budget" in err


# ---------------------------------------------------------------- the live scheduler


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (80, 80, 3), dtype=np.uint8)


def _audio(seconds: float = 3.0) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000


def test_first_start_measures_and_records_every_engine(fresh_bundle: Path) -> None:
    omni = Omni.load(fresh_bundle, memory_budget="2GiB")
    try:
        rec = json.loads((fresh_bundle / FOOTPRINT_FILE).read_text())
        engines = rec["measurements"]["CPUExecutionProvider"]["engines"]
        assert set(engines) == {"thinker", "vision", "audio"}
        assert all(e["load_bytes"] > 0 and e["runs"] >= 1 for e in engines.values())
        assert engines["thinker"]["run_bytes_per_unit"] > 0  # a long prefill was measured
        assert omni.scheduler.resident() == ["thinker"]  # the rest loads on demand
    finally:
        omni.close()
    again = Omni.load(fresh_bundle, memory_budget="2GiB")
    try:
        assert all(c.measured for c in again.scheduler.plan.costs.values())
        assert again.scheduler.stats.runs.total() == 0  # planned from the record: nothing re-measured
    finally:
        again.close()


def test_a_tight_budget_evicts_and_answers_stay_the_same(fresh_bundle: Path) -> None:
    ctx = 400
    long_prompt = "the cat sat on the mat and " * 45  # about 330 tokens: the thinker's working set grows
    requests = [
        {"prompt": long_prompt},
        {"prompt": "what colour is it?", "image": _image(1)},
        {"prompt": "what was said?", "audio": _audio((ctx - 60) / 13)},  # the longest audio that fits
        {"prompt": "what do you see and hear?", "image": _image(2), "audio": _audio(5.0)},
        {"prompt": "tell me a story", "temperature": 0.8, "seed": 7},
    ]
    omni = Omni.load(fresh_bundle, memory_budget="4GiB", max_context=ctx)  # measures, records
    s = omni.scheduler
    try:
        budget = s.plan.need(
            ctx
        )  # the least this bundle needs for its context: the encoders cannot both stay
        assert budget < s.plan.all_resident_bytes(ctx)
        with pytest.raises(BudgetError, match="context of 400 tokens"):
            s.set_budget(budget - 1)
        s.set_budget(budget)
        got = [omni.chat(max_new_tokens=8, **r).text for r in requests * 3]
        assert s.stats.evictions["vision"] + s.stats.evictions["audio"] >= 3
        assert s.stats.evictions["thinker"] == 0  # pinned
        assert s.stats.over_budget == 0  # no load or run peaked above the budget
        assert s.meter.current() <= budget
    finally:
        omni.close()
    reference = Omni.load(fresh_bundle)  # every engine loaded, no budget
    expected = [reference.chat(max_new_tokens=8, **r).text for r in requests]
    reference.close()
    assert got == expected * 3


def test_evictions_follow_the_plans_arithmetic_not_the_heap(fresh_bundle: Path) -> None:
    omni = Omni.load(fresh_bundle, memory_budget="4GiB", max_context=400)  # measures, records
    s = omni.scheduler
    try:
        assert omni.manifest.audio is not None
        s.set_budget(s.plan.need(400))  # the encoders fit together, except while the longest audio runs
        pixels = omni.preprocess("", image=_image()).pixel_values
        short = omni.preprocess("", audio=_audio(2.0)).chunks
        longest = omni.preprocess("", audio=_audio(omni.manifest.audio.max_seconds)).chunks
        assert pixels is not None and short is not None and longest is not None
        for _ in range(3):
            omni.encode_image(pixels)
            omni.encode_audio(short)
        assert sum(s.stats.evictions.values()) == 0 and set(s.resident()) == {"thinker", "vision", "audio"}
        for i in range(1, 3):
            omni.encode_image(pixels)
            omni.encode_audio(longest)  # the audio encoder takes it (the context is the thinker's)
            assert s.stats.evictions == {"vision": i} and set(s.resident()) == {"thinker", "audio"}
        assert s.stats.over_budget == 0
    finally:
        omni.close()


def test_the_context_shrinks_with_the_budget_and_a_longer_prompt_is_refused(fresh_bundle: Path) -> None:
    Omni.load(fresh_bundle, memory_budget="4GiB").close()  # the first start measures and records
    # Planned from the record, in a process that has already loaded ONNX Runtime's code (the first load
    # brings it into memory, and every later load counts it in its base), as the next load will be.
    roomy = Omni.load(fresh_bundle, memory_budget="4GiB")
    plan = roomy.scheduler.plan
    roomy.close()
    # Room for about 1000 tokens. omni-mini's KV cache is 2 KiB a token, so the context moves by 512 tokens
    # per MiB of base that this process holds more or less at the next load.
    budget = plan.need(1000)
    omni = Omni.load(fresh_bundle, memory_budget=budget)
    try:
        assert omni.scheduler.stats.runs.total() == 0  # planned from the record
        assert 256 <= omni.max_context < plan.max_context
        with pytest.raises(OmniedgeError, match="context"):
            omni.chat("word " * (omni.max_context + 10), max_new_tokens=2)
        assert omni.chat("still serving?", max_new_tokens=2).token_ids  # and it goes on
    finally:
        omni.close()


def test_conveniences_are_thin(omni_mini_bundle: Path) -> None:
    omni = Omni.load(omni_mini_bundle)
    try:
        assert (
            omni.describe(_image(), max_new_tokens=6)
            == omni.chat("Describe the image.", image=_image(), max_new_tokens=6).text
        )
        assert (
            omni.transcribe(_audio(), max_new_tokens=6)
            == omni.chat("Transcribe the audio.", audio=_audio(), max_new_tokens=6).text
        )
    finally:
        omni.close()


# ---------------------------------------------------------------- the queue


def test_queue_is_first_come_first_served_and_bounded() -> None:
    q = AdmissionQueue(max_waiting=2)
    order: list[int] = []
    gate = threading.Event()

    def worker(i: int) -> None:
        with q.turn():
            order.append(i)

    with q.turn():
        threads = []
        for i in range(2):
            threads.append(threading.Thread(target=worker, args=(i,)))
            threads[-1].start()
            while q.waiting < i + 1:  # admitted in this order
                time.sleep(0.001)
        with pytest.raises(QueueFullError, match="busy"), q.turn():
            pass
        assert q.refused == 1 and q.running == 1
        gate.set()
    for t in threads:
        t.join()
    assert order == [0, 1] and q.waiting == 0 and q.running == 0


def test_omni_refuses_a_request_past_its_queue(omni_mini_bundle: Path) -> None:
    omni = Omni.load(omni_mini_bundle, max_queue=0)
    try:
        with omni._queue.turn(), pytest.raises(QueueFullError):  # someone else's request is running
            omni.chat("hello", max_new_tokens=2)
        assert omni.chat("hello", max_new_tokens=2).token_ids
    finally:
        omni.close()
