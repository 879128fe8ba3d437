"""`omniedge serve` over real HTTP: the openai package and httpx against a running uvicorn server.

One server for the module (omni-mini under a memory budget, a 1 MiB request limit, one media root);
answers are compared with the same requests through `Omni.chat` with no server and no budget. Every bad
request must get a 4xx JSON error, and the server must keep serving after it.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import shutil
import struct
import threading
import time
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from omniedge.cli import main
from omniedge.runtime.app import Omni
from omniedge.runtime.server import ServerLimits, create_app, start_in_thread

openai = pytest.importorskip("openai")
MODEL = "omni-mini"
LIMIT = 1 * 2**20


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def served(omni_mini_bundle: Path, tmp_path_factory: pytest.TempPathFactory, media: Path) -> Iterator[dict]:
    bundle = tmp_path_factory.mktemp("srv") / "bundle"
    shutil.copytree(omni_mini_bundle, bundle)
    omni = Omni.load(bundle, memory_budget="2GiB", max_queue=1)
    limits = ServerLimits(max_request_bytes=LIMIT, media_roots=(media,))
    server, url = start_in_thread(create_app(omni, MODEL, limits))
    reference = Omni.load(bundle)  # no server, no budget
    yield {"url": url, "omni": omni, "reference": reference, "server": server}
    server.should_exit = True
    time.sleep(0.2)
    omni.close()
    reference.close()


@pytest.fixture
def http(served: dict) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served["url"], timeout=120) as c:
        yield c


@pytest.fixture
def client(served: dict) -> Any:
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _image(seed: int = 0, side: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _wav(samples: np.ndarray, rate: int = 16000, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.clip(samples, -1, 1) * 127 + 128).astype(np.uint8).tobytes())
        else:
            w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _speech(seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(3 * t)) * t)).astype(np.float32)


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _ask(http: httpx.Client, parts: list[dict] | str, **kw: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": 8, **kw}
    return http.post("/v1/chat/completions", json=body)


def _refused(r: httpx.Response, status: int, words: str, http: httpx.Client) -> None:
    """A clear JSON error with this status, and the server still answers afterwards."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert http.get("/health").json()["status"] == "ok"
    assert _ask(http, "still there?", max_tokens=2).status_code == 200


# ---------------------------------------------------------------- answers


def test_models_lists_the_one_model(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_text_answer_equals_the_python_api(client: Any, served: dict) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cat?"}],
        max_tokens=12,
        temperature=0.7,
        seed=3,
    )
    want = served["reference"].chat(
        "What is a cat?", system="Be brief.", max_new_tokens=12, temperature=0.7, seed=3
    )
    assert r.choices[0].message.content == want.text
    assert (
        r.usage.completion_tokens == len(want.token_ids)
        and r.usage.prompt_tokens == want.timings.prompt_tokens
    )
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason == "stop" else "length")


def test_streaming_gives_the_same_text_as_one_answer(client: Any) -> None:
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_image_and_audio_parts_answer_like_the_python_api(client: Any, served: dict, media: Path) -> None:
    img, wav = _image(5), _wav(_speech())
    (media / "scene.png").write_bytes(_png(img))
    (media / "question.wav").write_bytes(wav)
    want = served["reference"].chat(
        "What do you see and hear?", image=media / "scene.png", audio=media / "question.wav", max_new_tokens=8
    )
    for image_url in (
        _data_url(_png(img), "image/png"),
        str(media / "scene.png"),
        f"file://{media}/scene.png",
    ):
        r = client.chat.completions.create(
            model=MODEL,
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What do you see and hear?"},
                        _image_part(image_url),
                        _audio_part(wav),
                    ],
                }
            ],
        )
        assert r.choices[0].message.content == want.text


def test_a_path_outside_the_media_roots_is_refused(http: httpx.Client, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(_image()))
    _refused(_ask(http, [_image_part(str(outside))]), 403, "outside the server's media roots", http)


def test_cmyk_image_is_accepted_and_correct(http: httpx.Client, served: dict, media: Path) -> None:
    rgb = _image(7)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=98)
    (media / "cmyk.jpg").write_bytes(buf.getvalue())
    seen = served["reference"].preprocess("x", image=media / "cmyk.jpg").pixel_values
    truth = served["reference"].preprocess("x", image=rgb).pixel_values
    assert np.abs(seen - truth).mean() < 0.05  # the colours survive (normalised units, range 2)
    r = _ask(
        http, [{"type": "text", "text": "What colour?"}, _image_part(_data_url(buf.getvalue(), "image/jpeg"))]
    )
    assert r.status_code == 200
    want = served["reference"].chat("What colour?", image=media / "cmyk.jpg", max_new_tokens=8).text
    assert r.json()["choices"][0]["message"]["content"] == want


def test_16_bit_image_is_accepted_and_correct(http: httpx.Client, served: dict, media: Path) -> None:
    gray16 = (np.arange(96 * 96).reshape(96, 96) * 7 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG")
    (media / "g16.png").write_bytes(buf.getvalue())
    (media / "g8.png").write_bytes(_png((gray16 >> 8).astype(np.uint8)))
    r = _ask(
        http, [{"type": "text", "text": "What is it?"}, _image_part(_data_url(buf.getvalue(), "image/png"))]
    )
    assert r.status_code == 200
    ref = served["reference"]
    seen = ref.preprocess("x", image=media / "g16.png").pixel_values
    truth = ref.preprocess("x", image=media / "g8.png").pixel_values
    assert np.abs(seen - truth).max() < 0.02
    assert (
        r.json()["choices"][0]["message"]["content"]
        == ref.chat("What is it?", image=media / "g8.png", max_new_tokens=8).text
    )


# ---------------------------------------------------------------- refusals, each with the server staying up


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny data chunk and no more (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_empty_audio(http: httpx.Client) -> None:
    _refused(_ask(http, [_audio_part(b"")]), 400, "empty", http)


def test_corrupt_audio(http: httpx.Client) -> None:
    junk = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    _refused(_ask(http, [_audio_part(b"RIFF" + junk)]), 400, "cannot decode", http)


def test_audio_of_one_hour(http: httpx.Client, media: Path) -> None:
    hour = _wav(np.zeros(3600 * 1000, np.float32), rate=1000, width=1)  # 1 kHz 8-bit: 3.6 MB for an hour
    (media / "hour.wav").write_bytes(hour)
    part = {"type": "audio_url", "audio_url": {"url": str(media / "hour.wav")}}
    _refused(_ask(http, [part]), 400, "3600.0 s long", http)
    _refused(_ask(http, [_audio_part(hour)]), 413, "at most", http)  # and as base64 it is over the size limit


def test_image_of_one_pixel(http: httpx.Client) -> None:
    _refused(_ask(http, [_image_part(_data_url(_png(_image(side=1)), "image/png"))]), 400, "1x1 pixels", http)


def test_image_of_20000_by_20000_pixels_header_only(http: httpx.Client) -> None:
    url = _data_url(_png_header_only(20000, 20000), "image/png")
    _refused(_ask(http, [_image_part(url)]), 400, "pixels", http)  # refused from the header, never decoded


def test_prompt_longer_than_the_context(http: httpx.Client, served: dict) -> None:
    words = "word " * (served["omni"].max_context + 50)
    _refused(_ask(http, words), 400, "context", http)


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "omni-mini", "messages": [',
        headers={"content-type": "application/json"},
    )
    _refused(r, 400, "not valid JSON", http)


def test_unknown_model(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}
    )
    _refused(r, 404, "does not exist", http)
    assert r.json()["error"]["code"] == "model_not_found"


def test_request_over_the_size_limit(http: httpx.Client) -> None:
    _refused(_ask(http, "x" * (LIMIT + 10)), 413, "at most", http)


def test_errors_before_the_first_token_are_the_status_of_a_stream(http: httpx.Client) -> None:
    _refused(_ask(http, [_audio_part(b"")], stream=True), 400, "empty", http)


def test_unsupported_history_and_parts_are_refused(http: httpx.Client) -> None:
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    _refused(
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": history}),
        400,
        "assistant turns",
        http,
    )
    _refused(_ask(http, [{"type": "video_url", "video_url": {"url": "x"}}]), 400, "unsupported type", http)
    _refused(_ask(http, [_image_part("https://example.com/cat.png")]), 400, "remote URLs", http)


def test_a_full_queue_answers_429(http: httpx.Client, served: dict) -> None:
    omni = served["omni"]
    results: list[int] = []
    with omni._queue.turn():  # a request is running
        waiter = threading.Thread(target=lambda: results.append(_ask(http, "first").status_code))
        waiter.start()
        deadline = time.monotonic() + 30
        while http.get("/health").json()["queue"]["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=served["url"], timeout=60) as other:
            r = _ask(other, "second")
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    waiter.join()
    assert results == [200]


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "talk"}],
        "max_tokens": 200,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    assert _ask(http, "next one", max_tokens=2).status_code == 200


def test_a_budget_below_the_smallest_engine_is_refused_at_start(
    omni_mini_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(omni_mini_bundle), "--memory-budget", "1MB", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "memory budget 1.0 MiB is below the" in err and "fix: give --memory-budget" in err


# ---------------------------------------------------------------- health, metrics, keys, the robot example


def test_health_and_metrics(http: httpx.Client) -> None:
    assert _ask(http, "hello").status_code == 200
    h = http.get("/health").json()
    assert (
        h["memory"]["budget_bytes"] == 2 * 2**30 and h["memory"]["peak_bytes"] <= h["memory"]["budget_bytes"]
    )
    text = http.get("/metrics").text
    for name in (
        'omniedge_request_seconds_bucket{kind="text"',
        "omniedge_time_to_first_token_seconds_bucket",
        "omniedge_memory_bytes ",
        "omniedge_memory_peak_bytes ",
        "omniedge_memory_budget_bytes 2.147483648e+09",
        "omniedge_queue_waiting 0.0",
        'omniedge_engine_evictions_total{engine="audio"}',
        'omniedge_engine_loaded{engine="thinker"} 1.0',
        'omniedge_requests_total{kind="text",status="200"}',
    ):
        assert name in text, name


def test_an_api_key_is_required_when_set(served: dict) -> None:
    server, url = start_in_thread(create_app(served["omni"], MODEL, ServerLimits(api_key="k3y")))
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert c.post("/v1/chat/completions", json=body).status_code == 401
            ok = c.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer k3y"})
            assert ok.status_code == 200
    finally:
        server.should_exit = True


def test_the_robot_client_example_runs_against_the_server(served: dict, media: Path) -> None:
    path = Path(__file__).parents[1] / "jetson" / "robot_client.py"
    spec = importlib.util.spec_from_file_location("robot_client", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (media / "cam.png").write_bytes(_png(_image(9)))
    (media / "mic.wav").write_bytes(_wav(_speech()))
    text = module.ask(
        served["url"] + "/v1", "What do you see and hear?", media / "cam.png", media / "mic.wav"
    )
    want = served["reference"].chat(
        "What do you see and hear?", image=media / "cam.png", audio=media / "mic.wav", max_new_tokens=64
    )
    assert text == want.text
