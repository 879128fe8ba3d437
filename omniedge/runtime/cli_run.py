"""`omniedge run`: answer one request from the command line, streaming the answer as it is generated.

The answer goes to stdout (so it can be piped); the one-line timing summary goes to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omniedge.errors import OmniedgeError
from omniedge.runtime.generate import GenerationResult, Timings, TokenEvent


def _default_bundle() -> Path:
    try:
        from omniedge.defaults import default_bundle
    except ImportError as e:
        raise OmniedgeError(
            "no default model is available in this install",
            "pass a bundle directory: omniedge run BUNDLE ...",
        ) from e
    return Path(default_bundle())


def summary_line(t: Timings, load_s: float) -> str:
    """`12 tokens | load 0.41 s | TTFT 38 ms | 3.1 ms/token | 320 tok/s | image 9 ms | audio 14 ms`."""
    parts = [
        f"{t.new_tokens} tokens",
        f"prompt {t.prompt_tokens}",
        f"load {load_s:.2f} s",
        f"TTFT {t.ttft_s * 1e3:.0f} ms",
    ]
    if t.token_latencies_s:
        lat = sorted(t.token_latencies_s)
        parts.append(f"{lat[len(lat) // 2] * 1e3:.1f} ms/token p50")
        parts.append(f"{t.decode_tokens_per_s():.0f} tok/s")
    if t.image_encode_s:
        parts.append(f"image {t.image_encode_s * 1e3:.0f} ms")
    if t.audio_encode_s:
        parts.append(f"audio {t.audio_encode_s * 1e3:.0f} ms")
    return " | ".join(parts)


def run_cli(
    bundle: str | Path | None,
    prompt: str,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    providers: str | None = None,
    system: str | None = None,
) -> GenerationResult:
    """Load the bundle (the default model's when None), stream the answer to stdout, summary to stderr."""
    from omniedge.runtime.app import Omni

    bundle_dir = _default_bundle() if bundle is None else Path(bundle)
    t0 = time.perf_counter()
    omni = Omni.load(bundle_dir, providers=providers)
    load_s = time.perf_counter() - t0

    def show(ev: TokenEvent) -> None:
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

    try:
        result = omni.chat(
            prompt,
            image=image,
            audio=audio,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            system=system,
            on_token=show,
        )
    finally:
        omni.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"[{summary_line(result.timings, load_s)} | {result.finish_reason}]", file=sys.stderr)
    return result
