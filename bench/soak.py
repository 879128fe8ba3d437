"""Soak test: many mixed requests from several threads through `omniedge serve` under a memory budget
that forces evictions; checks that the measured peak never passes the budget, that every answer equals
the single-threaded answer for the same request and seed, that no request is lost, and that memory stays
flat (the slope of the server's RSS over the run); reports p50/p99 latency and throughput.

    python3 -m omniedge.bench.soak --requests 500 --threads 8 --json bench/results/soak.json

The server runs with `--max-context` tokens and a budget of the least the bundle needs for them, as a
first server measures it (its plan's peak bound), plus `BASE_ALLOWANCE`: the soak's server is another
process, whose own memory before any engine differs from the first one's by up to a few hundred KiB
(seen here), and without the allowance that alone could make it refuse the context. The budget stays
below what every engine resident at once would take, so the encoders cannot both stay resident while
the longest audio the context takes runs (one of the requests), and evict each other.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.bench.inputs import bench_audio, bench_image
from omniedge.prompts import ASR_PROMPT

MODEL = "omni-mini"
BASE_ALLOWANCE = 2**20  # bytes added to the first server's least budget (see the module docstring)
# About 225 tokens with omni-mini's chat template: within the least context a budget is planned for (256).
LONG_TEXT = "Tell me what a robot in a busy kitchen should watch out for, and why, in order. " * 8


def _png(a: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wav(x: np.ndarray) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def longest_audio_seconds(bundle: Path, max_context: int) -> float:
    """Whole seconds of the longest audio whose request fits `max_context` tokens (the audio tokens, about
    13 a second, plus 40 for the prompt and answer), at most what the bundle takes."""
    from omniedge.runtime.manifest import load_manifest

    m = load_manifest(bundle)
    assert m.audio is not None, "the soak needs a bundle with an audio encoder"
    per_second = m.position_id_per_seconds or 13
    return float(min(m.audio.max_seconds, (max_context - 40) // per_second))


def mixed_requests(max_tokens: int = 16, longest_audio_s: float = 20.0) -> list[dict[str, Any]]:
    """16 distinct requests: text, image, audio and image+audio, greedy and seeded sampling; one of them
    with audio of `longest_audio_s` seconds."""
    img = [_png(bench_image(96, seed=s)) for s in range(3)]
    aud = {s: _wav(bench_audio(s, seed=int(s))) for s in (2.0, 5.0, 8.0)}
    longest = _wav(bench_audio(longest_audio_s, seed=20))

    def req(text: str, image: str | None = None, audio: str | None = None, **kw: Any) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image:
            parts.append({"type": "image_url", "image_url": {"url": image}})
        if audio:
            parts.append({"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}})
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": max_tokens,
            **kw,
        }

    return [
        req("What is a kitchen?"),
        req(LONG_TEXT),
        req("Write a line about the sea.", temperature=0.8, seed=11),
        req("Name three colours.", temperature=1.0, top_p=0.9, seed=5),
        req("What colour is the square?", img[0]),
        req("Describe the picture.", img[1]),
        req("What is in the image?", img[2], temperature=0.7, seed=3),
        req("What was said?", audio=aud[2.0]),
        req(ASR_PROMPT, audio=aud[8.0]),
        req("What did the person ask?", audio=longest),
        req("Summarise the recording.", audio=aud[5.0], temperature=0.9, seed=2),
        req("Answer the spoken question about the image.", img[0], aud[2.0]),
        req("What do you see and hear?", img[1], aud[5.0]),
        req("Describe both.", img[2], aud[8.0], temperature=0.6, seed=9),
        req(LONG_TEXT[:200], img[1]),
        req("Is anyone speaking?", img[0], aud[5.0], seed=1),
    ]


def _kind(body: dict[str, Any]) -> str:
    types = {p["type"] for p in body["messages"][0]["content"]}
    out = [k for k, t in (("image", "image_url"), ("audio", "input_audio")) if t in types]
    return "+".join(out) or "text"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`omniedge serve` in a child process, so its memory is its own."""

    def __init__(self, bundle: Path, budget: str | int, max_context: int | None, max_queue: int) -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "omniedge", "serve", str(bundle), "--port", str(self.port)]
        cmd += ["--memory-budget", str(budget), "--max-queue", str(max_queue)]
        if max_context:
            cmd += ["--max-context", str(max_context)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited: {self.proc.stdout.read() if self.proc.stdout else ''}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not come up in 300 s")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def references(bundle: Path, bodies: list[dict[str, Any]], max_context: int | None = None) -> list[str]:
    """Single-threaded answers through the same server code path (one client, one request at a time,
    a roomy budget, another process): what each request must get back under load."""
    import httpx

    server = ServerProcess(bundle, "90%", max_context, 4)
    try:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            return [
                c.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"]
                for b in bodies
            ]
    finally:
        server.stop()


def _sample_rss(
    pid: int, stop: threading.Event, out: list[tuple[float, int]], period_s: float = 0.05
) -> None:
    import psutil

    proc = psutil.Process(pid)
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            out.append((time.perf_counter() - t0, int(proc.memory_info().rss)))
        except psutil.Error:
            return
        time.sleep(period_s)


def run_soak(bundle: Path, requests: int = 500, threads: int = 8, max_context: int = 400) -> dict[str, Any]:
    """The soak; returns the report (see the module docstring for what it checks)."""
    import httpx

    bodies = mixed_requests(longest_audio_s=longest_audio_seconds(bundle, max_context))
    expected = references(bundle, bodies, max_context)  # a first start also measures the engines
    probe = ServerProcess(bundle, "90%", max_context, 4)
    try:
        plan = probe.health()["memory"]["plan"]
    finally:
        probe.stop()
    budget = int(plan["peak_bound_bytes"]) + BASE_ALLOWANCE
    server = ServerProcess(bundle, budget, max_context, threads + 8)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(server.proc.pid, stop, samples), daemon=True)
    results: list[dict[str, Any]] = [{} for _ in range(requests)]

    def one(i: int) -> None:
        body = bodies[i % len(bodies)]
        t = time.perf_counter()
        try:
            with httpx.Client(base_url=server.url, timeout=600) as c:
                r = c.post("/v1/chat/completions", json=body)
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
            results[i] = {
                "status": r.status_code,
                "text": text,
                "error": None if text is not None else r.text,
            }
        except httpx.HTTPError as e:
            results[i] = {"status": None, "text": None, "error": repr(e)}
        results[i].update(
            kind=_kind(body),
            seconds=time.perf_counter() - t,
            same=results[i]["text"] == expected[i % len(bodies)],
        )

    try:
        start = server.health()
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
        end = server.health()
    finally:
        stop.set()
        server.stop()
    lat = np.array([r["seconds"] for r in results])
    t, rss = (
        (np.array(v, dtype=np.float64) for v in zip(*samples, strict=True))
        if samples
        else (np.zeros(1), np.zeros(1))
    )
    tail = t >= t[-1] * 0.1  # the first tenth is warm-up (arenas grow to their working size)
    slope = float(np.polyfit(t[tail], rss[tail], 1)[0]) if tail.sum() > 2 else 0.0
    mem = end["memory"]
    return {
        "requests": requests,
        "threads": threads,
        "distinct_requests": len(bodies),
        "kinds": {k: sum(r["kind"] == k for r in results) for k in ("text", "image", "audio", "image+audio")},
        "context": end["context"],
        "budget_bytes": budget,
        "plan_at_start": start["memory"]["plan"],
        "peak_bytes": mem["peak_bytes"],
        "sampled_peak_bytes": int(rss.max()),
        "over_budget_events": mem["over_budget"],
        "evictions": mem["evictions"],
        "loads": mem["loads"],
        "answered": sum(r["status"] == 200 for r in results),
        "equal_to_single_threaded": sum(bool(r["same"]) for r in results),
        "lost": [
            dict(i=i, **{k: r[k] for k in ("status", "error")})
            for i, r in enumerate(results)
            if r["status"] != 200
        ][:10],
        "mismatched": [i for i, r in enumerate(results) if r["status"] == 200 and not r["same"]][:20],
        "latency_s": {
            "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)),
            "max": float(lat.max()),
        },
        "throughput_rps": requests / wall,
        "wall_s": wall,
        "rss_slope_bytes_per_s": slope,
        "rss_slope_mib_per_100_requests": slope * wall / requests * 100 / 2**20,
        "rss_first_last_mib": [float(rss[tail][0] / 2**20), float(rss[-1] / 2**20)],
    }


def markdown(report: dict[str, Any]) -> str:
    r, mib = report, 2**20
    return "\n".join(
        [
            f"# Soak: {r['requests']} requests, {r['threads']} threads, omniedge serve on {r['machine']['cpu']}",
            "",
            f"command: `{r['command']}`  ",
            f"when: {r['when']}, omniedge {r['omniedge']}, onnxruntime {r['machine']['onnxruntime']} (CPU provider), "
            f"{r['machine']['cores']} cores, {r['machine']['ram_gib']} GiB RAM",
            "",
            "| what | measured |",
            "|---|---|",
            f"| budget | {r['budget_bytes'] / mib:.1f} MiB (context {r['context']} tokens; every engine resident "
            f"would take {r['plan_at_start']['all_resident_bytes'] / mib:.1f} MiB) |",
            f"| peak (server's own high-water mark) | {r['peak_bytes'] / mib:.1f} MiB |",
            f"| peak (RSS sampled every 50 ms from outside) | {r['sampled_peak_bytes'] / mib:.1f} MiB |",
            f"| loads or runs above the budget | {r['over_budget_events']} |",
            f"| evictions | {r['evictions']} |",
            f"| answered | {r['answered']} of {r['requests']} ({r['kinds']}) |",
            f"| equal to the single-threaded answer | {r['equal_to_single_threaded']} of {r['requests']} |",
            f"| latency p50 / p99 | {r['latency_s']['p50'] * 1e3:.0f} ms / {r['latency_s']['p99'] * 1e3:.0f} ms |",
            f"| throughput | {r['throughput_rps']:.1f} requests/s |",
            f"| RSS slope after warm-up | {r['rss_slope_bytes_per_s'] / 1024:.1f} KiB/s = "
            f"{r['rss_slope_mib_per_100_requests']:.2f} MiB per 100 requests "
            f"({r['rss_first_last_mib'][0]:.1f} -> {r['rss_first_last_mib'][1]:.1f} MiB) |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    from omniedge import __version__
    from omniedge.bench.system import machine
    from omniedge.defaults import default_bundle

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", help="engine bundle (default: the built-in default model)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--max-context", type=int, default=400, help="context the budget is the least for")
    p.add_argument("--json", type=Path, required=True, help="where to write the report (and .md beside it)")
    args = p.parse_args(argv)
    bundle = Path(args.bundle) if args.bundle else default_bundle(subprocess=True)
    report = run_soak(bundle, args.requests, args.threads, args.max_context)
    report = {
        "omniedge": __version__,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            shlex.quote(a) for a in ["python3", "-m", "omniedge.bench.soak", *(argv or sys.argv[1:])]
        ),
        "machine": machine(),
        "bundle": str(bundle),
        **report,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    ok = (
        report["peak_bytes"] <= report["budget_bytes"]
        and report["answered"] == report["equal_to_single_threaded"] == report["requests"]
        and sum(report["evictions"].values()) > 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
