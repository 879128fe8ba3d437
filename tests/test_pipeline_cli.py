"""The whole product through its CLI, as a newcomer types it: compress -> export -> info -> run -> bench."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")


def _cli(*args: str, env_home: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "OMNIEDGE_HOME": str(env_home)}
    return subprocess.run(
        [sys.executable, "-m", "omniedge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _write_media(d: Path) -> tuple[Path, Path]:
    from PIL import Image

    img = np.zeros((120, 160, 3), np.uint8)
    img[30:90, 40:100] = (200, 30, 30)
    Image.fromarray(img).save(d / "scene.png")
    t = np.arange(int(16000 * 1.3)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(d / "q.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return d / "scene.png", d / "q.wav"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


def test_compress_export_run_bench(work: Path) -> None:
    home = work / "home"
    ck, bundle = work / "tiny-int4", work / "bundle"
    r = _cli("compress", "tiny", "-o", ck, "--keep-ratio", "0.5", env_home=home)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["thinker_config"]["text_config"]["num_experts"] == 4
    meta = json.loads((ck / "omniedge.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["prune", "quantize"]

    r = _cli("export", ck, "-o", bundle, env_home=home)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["components"]) >= {"vision", "audio", "thinker"}

    r = _cli("info", bundle, env_home=home)
    assert r.returncode == 0 and "thinker" in r.stdout and "vision" in r.stdout
    r = _cli("info", ck, env_home=home)
    assert r.returncode == 0 and "int4" in r.stdout and "4 experts" in r.stdout

    image, audio = _write_media(work)
    r = _cli(
        "run",
        bundle,
        "-p",
        "What is red?",
        "--image",
        image,
        "--audio",
        audio,
        "--max-new-tokens",
        "5",
        env_home=home,
    )
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stderr  # the timing line

    report = work / "bench.json"
    r = _cli("bench", bundle, "--runs", "2", "--new-tokens", "4", "--json", report, env_home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["image_ms"]["n"] == 2 and rep["speech_in"]["rtf"] > 0 and rep["load_s"]["thinker"] > 0
    assert rep["ttft_ms_text"]["p50"] > 0 and rep["memory"]["peak_rss_mib"] > 0
    md = report.with_suffix(".md").read_text()
    assert md.startswith("# omniedge bench")
    # 2 runs: a median, but no p90/p99 (they need 10 and 100 samples); the report says so
    assert rep["ttft_ms_text"]["p90"] is None and rep["token_ms"]["p99"] is None
    assert "p90 need >= 10 samples (have 2)" in md and "p90/p99 need >= 10 samples" in md


def test_undecodable_media_is_a_clear_error(work: Path) -> None:
    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        pytest.skip("needs the bundle of test_compress_export_run_bench")
    bad = work / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    r = _cli("run", bundle, "--image", bad, env_home=work / "home")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "broken.png" in r.stderr and "fix:" in r.stderr
    bad_wav = work / "broken.wav"
    bad_wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    r = _cli("run", bundle, "--audio", bad_wav, env_home=work / "home")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "broken.wav" in r.stderr
