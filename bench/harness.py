"""`omniedge bench`: load an engine bundle and measure what a robot or kiosk user feels.

Load time per engine, time to first token (text only, and with an image and audio), per-token latency
(first token excluded), image latency (preprocess + encode), speech-in real-time factor (preprocess +
encode time / audio duration), peak memory and power where readable. Several runs, percentiles reported.
"""

from __future__ import annotations

import datetime as dt
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from omniedge import __version__
from omniedge.bench.decode_depth import decode_at_depth, run_spread
from omniedge.bench.inputs import bench_audio, bench_image
from omniedge.bench.report import check_report_paths, write_reports
from omniedge.bench.stats import summarize_ms
from omniedge.bench.system import PowerSampler, machine, peak_rss_bytes
from omniedge.errors import OmniedgeError

TEXT_PROMPT = "Describe a busy kitchen in the morning, step by step, in plain words."
MM_PROMPT = "What do you see in the picture and what did the person say?"
AUDIO_SECONDS = 5.0


_ms = summarize_ms  # percentiles only with enough samples (bench/stats.py)


def run_bench(
    bundle: Path,
    runs: int = 5,
    new_tokens: int = 32,
    providers: str | list[str] | None = None,
    progress: bool = True,
    contexts: list[int] | None = None,
    baseline: Path | None = None,
) -> dict[str, Any]:
    """Measure one bundle; returns the report dict (see bench/report.py for the files).

    `contexts`: also decode `new_tokens` after prompts of these lengths (decode at depth, run-to-run spread);
    `baseline`: the checkpoint the bundle came from, decoded by transformers at the same contexts in a child
    process (its memory stays out of this process), for a ratio measured in the same run."""
    from omniedge.runtime.app import Omni

    if runs < 1 or new_tokens < 2:
        raise OmniedgeError("bench needs --runs >= 1 and --new-tokens >= 2", "raise them")
    say = print if progress else (lambda *a, **k: None)
    rss0 = peak_rss_bytes()
    t0 = time.perf_counter()
    context = max([*(contexts or []), 0]) + new_tokens + 8
    omni = Omni.load(bundle, providers=providers, max_context=max(context, 4096))
    load_total = time.perf_counter() - t0
    say(f"loaded {bundle} in {load_total:.2f} s")
    m = omni.manifest
    side = m.image.size[0] if m.image else 448
    image = bench_image(side)
    wav = bench_audio(AUDIO_SECONDS)
    audio = (wav, 16000)
    has_image, has_audio = m.image is not None, m.audio is not None

    # Warm-up: first calls allocate arenas and pick kernels; not reported.
    omni.chat(
        MM_PROMPT, image=image if has_image else None, audio=audio if has_audio else None, max_new_tokens=2
    )

    power = PowerSampler()
    report: dict[str, Any] = {}
    with power:
        image_ms: list[float] = []
        image_pre: list[float] = []
        if has_image:
            for _ in range(runs):
                t = time.perf_counter()
                req = omni.preprocess("x", image=image)
                t1 = time.perf_counter()
                omni.encode_image(req.pixel_values)
                image_pre.append(t1 - t)
                image_ms.append(time.perf_counter() - t)
        speech: list[float] = []
        if has_audio:
            for _ in range(runs):
                t = time.perf_counter()
                req = omni.preprocess("x", audio=audio)
                omni.encode_audio(req.chunks)
                speech.append(time.perf_counter() - t)
        ttft, tokens, counts, medians = [], [], [], []
        for r in range(runs):
            res = omni.chat(TEXT_PROMPT, max_new_tokens=new_tokens, seed=r)
            ttft.append(res.timings.ttft_s)
            tokens.extend(res.timings.token_latencies_s)
            counts.append(res.timings.new_tokens)
            if res.timings.token_latencies_s:
                medians.append(float(np.median(res.timings.token_latencies_s)) * 1e3)
            say(
                f"  text run {r + 1}/{runs}: {res.timings.new_tokens} tokens, ttft {res.timings.ttft_s * 1e3:.1f} ms"
            )
        mm_ttft = []
        if has_image or has_audio:
            for _ in range(runs):
                res = omni.chat(
                    MM_PROMPT,
                    image=image if has_image else None,
                    audio=audio if has_audio else None,
                    max_new_tokens=2,
                )
                mm_ttft.append(res.timings.ttft_s)
        depth = [decode_at_depth(omni, c, new_tokens, runs) for c in contexts or []]
    tok = _ms(tokens)
    report = {
        "omniedge": __version__,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["omniedge", *sys.argv[1:]]) if sys.argv else "",
        "machine": machine(),
        "bundle": {"path": str(bundle), "model": m.model_name, "components": sorted(omni.engines)},
        "providers": providers or "CPUExecutionProvider",
        "runs": runs,
        "load_s": {"total": load_total, **omni.load_seconds},
        "ttft_ms_text": _ms(ttft),
        "ttft_ms_image_audio": _ms(mm_ttft),
        "token_ms": tok,
        "token_ms_spread": run_spread(medians),
        "decode_tok_s": 1e3 / tok["mean"] if tok.get("n") else None,
        "contexts": depth,
        "new_tokens_per_run": counts,
        "image_ms": {
            **_ms(image_ms),
            "preprocess_mean": float(np.mean(image_pre) * 1e3) if image_pre else None,
            "size": list(m.image.size) if m.image else None,
        },
        "speech_in": {
            "audio_s": AUDIO_SECONDS,
            "process_ms": _ms(speech),
            "rtf": float(np.mean(speech) / AUDIO_SECONDS) if speech else None,
        },
        "memory": {
            "peak_rss_mib": peak_rss_bytes() / 2**20,
            "rss_before_load_mib": rss0 / 2**20,
            "engines_footprint_mib": omni.footprint_bytes() / 2**20,
        },
        "power_w": power.mean_watts(),
    }
    omni.close()
    if baseline is not None and contexts:
        from omniedge.bench.baseline_hf import run_baseline_subprocess

        args = [
            str(baseline),
            "--contexts",
            *map(str, contexts),
            "--new-tokens",
            str(new_tokens),
            "--runs",
            str(runs),
        ]
        say(f"transformers baseline on {baseline} ...")
        report["baseline"] = run_baseline_subprocess(args)
        for ours, theirs in zip(report["contexts"], report["baseline"]["contexts"], strict=True):
            a, b = ours["token_ms"].get("p50"), theirs["token_ms"].get("p50")
            ours["speedup_vs_baseline"] = (b / a) if a and b else None
    return report


def bench_cli(
    bundle: str | None,
    runs: int,
    new_tokens: int,
    json_path: Path | None,
    providers: str | None = None,
    contexts: list[int] | None = None,
    baseline: Path | None = None,
) -> dict[str, Any]:
    from omniedge.runtime.manifest import load_manifest

    if json_path is not None:
        check_report_paths(json_path)
    if bundle is None:
        from omniedge.defaults import default_bundle

        path = default_bundle(subprocess=True)
    else:
        path = Path(bundle)
        load_manifest(path)  # a clear error for a path that is not a bundle
    if baseline is not None and not contexts:
        raise OmniedgeError("--baseline compares decode at --contexts", "add e.g. --contexts 64 512")
    report = run_bench(
        path, runs=runs, new_tokens=new_tokens, providers=providers, contexts=contexts, baseline=baseline
    )
    if json_path is None:
        from omniedge.paths import home

        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = home() / "bench" / f"bench-{stamp}.json"
    md = write_reports(report, json_path)
    print(md)
    print(f"report: {json_path} and {json_path.with_suffix('.md')}")
    return report
