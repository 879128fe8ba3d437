"""End to end: tiny checkpoint -> bundle -> `Omni` answers text + image + audio, token for token as
transformers' thinker does greedily; plus the generation loop's contract (sampling, stops, streaming,
cancellation, threads) and the errors a user can cause (bad media, prompt past the context, bad bundles).
"""

from __future__ import annotations

import json
import shutil
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from omniedge.errors import OmniedgeError
from omniedge.runtime.generate import (
    SamplingParams,
    ThinkerInputs,
    Timings,
    _HostLogits,
    generate_tokens,
    sample_token,
)
from omniedge.runtime.manifest import load_manifest

NEW_TOKENS = 12
PROMPT = "What do you see and hear?"


# ---------------------------------------------------------------- generation loop with a scripted graph


class _ScriptedThinker:
    """A stand-in thinker runner: always predicts (position + 1) mod vocab; records what it was fed."""

    def __init__(self, vocab: int = 10, max_context: int = 100) -> None:
        self.vocab = vocab
        self.max_context = max_context
        self.calls: list[tuple[str, int, int]] = []  # (step, tokens fed, last position)

    def _out(self, position: int):
        logits = np.zeros(self.vocab, np.float32)
        logits[(position + 1) % self.vocab] = 5.0
        return _HostLogits(logits)

    def prefill(self, inputs_embeds: np.ndarray, positions: np.ndarray, deepstack: np.ndarray | None):
        self.calls.append(("prefill", inputs_embeds.shape[1], int(positions[0, -1])))
        return self._out(int(positions[0, -1]))

    def decode(self, embed_row: np.ndarray, position: int):
        self.calls.append(("decode", 1, position))
        return self._out(position)


def _scripted(prompt_len: int = 3, delta: int = 0):
    thinker = _ScriptedThinker()
    embed = np.eye(10, 8, dtype=np.float32)
    ids = np.arange(prompt_len) % 10
    pos = np.broadcast_to(np.arange(prompt_len), (3, 1, prompt_len)).copy()
    inputs = ThinkerInputs(ids, embed[ids][None], pos, np.zeros((0, 1, prompt_len, 8), np.float32), delta)
    return thinker, thinker, embed, inputs


def test_decode_loop_feeds_one_token_after_the_prefill_and_stops_on_eos() -> None:
    graph, thinker, embed, inputs = _scripted()
    t = Timings()
    toks = list(generate_tokens(thinker, embed, inputs, (7,), SamplingParams(max_new_tokens=20), 100, t))
    assert toks == [3, 4, 5, 6, 7]  # positions continue 3, 4, ...; eos 7 is returned and ends it
    assert graph.calls == [
        ("prefill", 3, 2),
        ("decode", 1, 3),
        ("decode", 1, 4),
        ("decode", 1, 5),
        ("decode", 1, 6),
    ]
    assert t.new_tokens == 5 and len(t.token_latencies_s) == 4 and t.prompt_tokens == 3 and t.ttft_s > 0


def test_decode_uses_the_rope_delta() -> None:
    _, thinker, embed, inputs = _scripted(delta=-2)
    toks = list(generate_tokens(thinker, embed, inputs, (), SamplingParams(max_new_tokens=3), 100, Timings()))
    assert toks == [3, 2, 3]  # prefill's last position 2 -> 3; then cache 3 - 2 = 1 -> 2, 4 - 2 = 2 -> 3


def test_max_new_tokens_and_context_limit() -> None:
    _, thinker, embed, inputs = _scripted()
    assert (
        len(
            list(
                generate_tokens(thinker, embed, inputs, (), SamplingParams(max_new_tokens=4), 100, Timings())
            )
        )
        == 4
    )
    # context 8: the cache may hold 8 tokens, so 3 prompt + 5 fed back, the 6th is returned unfed
    assert (
        len(
            list(generate_tokens(thinker, embed, inputs, (), SamplingParams(max_new_tokens=50), 8, Timings()))
        )
        == 6
    )
    with pytest.raises(OmniedgeError, match="context"):
        list(generate_tokens(thinker, embed, inputs, (), SamplingParams(), 3, Timings()))


def test_cancel_stops_between_tokens() -> None:
    _, thinker, embed, inputs = _scripted()
    cancel = threading.Event()
    got = []
    for tok in generate_tokens(
        thinker, embed, inputs, (), SamplingParams(max_new_tokens=50), 100, Timings(), cancel
    ):
        got.append(tok)
        if len(got) == 2:
            cancel.set()
    assert len(got) == 2


def test_sampling_is_seeded_and_respects_top_k_and_top_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert sample_token(logits, SamplingParams(temperature=0.0), np.random.default_rng(0)) == 0

    def draws(**kw) -> np.ndarray:
        rng = np.random.default_rng(kw.pop("seed", 0))
        return np.array(
            [sample_token(logits, SamplingParams(temperature=1.0, **kw), rng) for _ in range(4000)]
        )

    full = draws()
    np.testing.assert_allclose(np.bincount(full, minlength=4) / full.size, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_array_equal(draws(seed=5), draws(seed=5))
    assert set(draws(top_k=2)) == {0, 1}
    assert set(draws(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 covers it: the rest is cut
    assert set(draws(top_p=0.4)) == {0}
    with pytest.raises(OmniedgeError):
        SamplingParams(top_p=0.0).check()
    with pytest.raises(OmniedgeError):
        SamplingParams(temperature=-1).check()


# ---------------------------------------------------------------- the tiny model, exported


def test_the_e2e_model_is_pruned_and_int4(checkpoint: Path) -> None:
    import json

    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["thinker_config"]["text_config"]["num_experts"] == 6  # 8 -> 6: the default recipe keeps 75%
    assert cfg["omniedge_quantization"]["bits"] == 4 and (checkpoint / "int4.safetensors").is_file()


@pytest.fixture(scope="module", params=["ort", "portable"])
def bundle(bundle: Path, request: pytest.FixtureRequest) -> Path:
    """Every test here runs on both thinker flavours (conftest's `bundle` is the ORT one)."""
    return bundle if request.param == "ort" else request.getfixturevalue("portable_bundle")


@pytest.fixture(scope="module")
def omni(bundle: Path):
    from omniedge.runtime.app import Omni

    o = Omni.load(bundle)
    yield o
    o.close()


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path):
    from omniedge.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return model


def _image() -> np.ndarray:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    img[20:60, 10:50] = [220, 30, 30]
    return img


def _audio() -> tuple[np.ndarray, int]:
    t = np.arange(int(22050 * 1.7)) / 22050  # 1.7 s at 22.05 kHz: resampled, two chunks, partial last
    x = 0.4 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    return x.astype(np.float32), 22050


def _hf_greedy(model, req, eos: tuple[int, ...], n: int) -> list[int]:
    """transformers' own greedy generation (thinker.generate: prefill, then decode with its KV cache)."""
    from omniedge.bench.parity import hf_greedy

    return hf_greedy(model, req, eos, n)[0]


@pytest.mark.parametrize("media", ["text", "image", "audio", "image+audio"])
def test_greedy_equals_transformers(omni, hf_model, media: str) -> None:
    image = _image() if "image" in media else None
    audio = _audio() if "audio" in media else None
    req = omni.preprocess(PROMPT, image=image, audio=audio)
    res = omni.chat(PROMPT, image=image, audio=audio, max_new_tokens=NEW_TOKENS)
    ref = _hf_greedy(hf_model, req, omni.manifest.eos_token_ids, NEW_TOKENS)
    assert res.token_ids == ref
    assert res.text == omni.tokenizer.decode(ref, skip_special_tokens=True)
    t = res.timings
    assert t.prompt_tokens == req.prompt.ids.size and t.new_tokens == len(ref) and t.ttft_s > 0
    assert (t.image_encode_s > 0) == (image is not None) and (t.audio_encode_s > 0) == (audio is not None)


def test_prefill_logits_match_transformers(omni, hf_model) -> None:
    import torch

    req = omni.preprocess(PROMPT, image=_image(), audio=_audio())
    inputs = omni.thinker_inputs(req)
    logits = omni.thinker.prefill(
        inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds
    ).logits()
    with torch.no_grad():
        ref = hf_model.thinker(
            input_ids=torch.from_numpy(req.prompt.ids)[None],
            pixel_values=torch.from_numpy(req.pixel_values),
            image_grid_thw=torch.tensor([list(req.image_grid_thw)]),
            input_features=torch.from_numpy(req.mel)[None],
            feature_attention_mask=torch.ones(1, req.mel.shape[1], dtype=torch.long),
            attention_mask=torch.ones(1, req.prompt.ids.size, dtype=torch.long),
            use_cache=False,
        ).logits[0, -1]
    np.testing.assert_allclose(logits, ref.numpy(), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("with_image", [False, True])
def test_stream_and_callbacks_give_the_same_text(omni, with_image: bool) -> None:
    # (the random tiny model's text-only answer ends inside a UTF-8 sequence: the held-back tail must come out)
    seen = []
    image = _image() if with_image else None
    res = omni.chat(PROMPT, image=image, max_new_tokens=NEW_TOKENS, on_token=seen.append)
    pieces = list(omni.stream(PROMPT, image=image, max_new_tokens=NEW_TOKENS))
    assert "".join(pieces) == "".join(e.text for e in seen) == res.text
    assert [e.token_id for e in seen] == res.token_ids and [e.index for e in seen] == list(range(len(seen)))


def test_sampling_through_the_app_is_reproducible(omni) -> None:
    a = omni.chat(PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    b = omni.chat(PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_cancel_through_the_app(omni) -> None:
    cancel = threading.Event()

    def stop_after_three(ev) -> None:
        if ev.index == 2:
            cancel.set()

    res = omni.chat(PROMPT, max_new_tokens=40, cancel=cancel, on_token=stop_after_three)
    if len(res.token_ids) == 3 and res.token_ids[-1] in omni.manifest.eos_token_ids:
        pytest.skip("the tiny model stopped by itself at the third token")
    assert len(res.token_ids) == 3 and res.finish_reason == "cancelled"


def test_threads_share_one_omni(omni) -> None:
    expect = omni.chat(PROMPT, image=_image(), max_new_tokens=6).token_ids
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(omni.chat(PROMPT, image=_image(), max_new_tokens=6).token_ids)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and results == [expect] * 3


# ---------------------------------------------------------------- engine backend


def test_ort_backend_loads_runs_and_unloads(bundle: Path) -> None:
    from omniedge.runtime.backends import EngineBackend, OrtBackend, resolve_providers

    m = load_manifest(bundle)
    eng = OrtBackend("vision", m.components["vision"].onnx)
    assert isinstance(eng, EngineBackend) and not eng.loaded and eng.footprint_bytes() == 0
    eng.load()
    assert eng.loaded and eng.footprint_bytes() >= eng.file_bytes > 0
    assert eng.input_names() == ["pixel_values"] and "image_embeds" in eng.output_names()
    n = int(np.prod(m.image.grid_thw))
    out = eng.run({"pixel_values": np.zeros((n, 1536), np.float64)})  # cast to the graph's float32
    assert out["image_embeds"].shape == (m.image.num_tokens, m.text.hidden_size)
    with pytest.raises(OmniedgeError, match="needs inputs"):
        eng.run({})
    eng.unload()
    assert not eng.loaded and eng.footprint_bytes() == 0
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in resolve_providers("auto")
    with pytest.raises(OmniedgeError, match="not available"):
        resolve_providers(["no-such-provider"])


# ---------------------------------------------------------------- user errors


def test_corrupt_image_file(omni, tmp_path: Path) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    with pytest.raises(OmniedgeError, match="cannot decode image"):
        omni.chat(PROMPT, image=bad)


def test_empty_wav(omni, tmp_path: Path) -> None:
    f = tmp_path / "empty.wav"
    with wave.open(str(f), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    with pytest.raises(OmniedgeError, match="no samples"):
        omni.chat(PROMPT, audio=f)


def test_truncated_wav_is_answered_with_a_warning(
    bundle: Path, omni, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A WAV whose header promises 2 s but holds 0.67 s: used, and said so in the result and on the CLI."""
    from omniedge.runtime.cli_run import run_cli

    t = np.arange(32000) / 16000
    f = tmp_path / "cut.wav"
    with wave.open(str(f), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes())
    f.write_bytes(f.read_bytes()[: 44 + 2 * 10720])
    res = omni.chat(PROMPT, audio=f, max_new_tokens=3)
    assert len(res.warnings) == 1 and "truncated" in res.warnings[0] and "0.67 s" in res.warnings[0]
    assert omni.chat(PROMPT, audio=_audio(), max_new_tokens=3).warnings == []
    with pytest.warns(UserWarning, match="truncated"):
        "".join(omni.stream(PROMPT, audio=f, max_new_tokens=3))
    capsys.readouterr()
    run_cli(str(bundle), PROMPT, audio=f, max_new_tokens=3)
    assert "warning: audio file" in capsys.readouterr().err


def test_prompt_past_the_context(bundle: Path) -> None:
    from omniedge.runtime.app import Omni

    small = Omni.load(bundle, max_context=24)
    try:
        with pytest.raises(OmniedgeError, match="context"):
            small.chat("hello " * 40)
        assert small.chat("hi", max_new_tokens=40).timings.prompt_tokens < 24  # short prompts still work
    finally:
        small.close()


def test_run_cli_streams_to_stdout(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omniedge.runtime.cli_run import run_cli

    res = run_cli(str(bundle), PROMPT, max_new_tokens=5)
    out, err = capsys.readouterr()
    assert out == res.text + "\n"
    assert "TTFT" in err and f"{res.timings.new_tokens} tokens" in err


# ---------------------------------------------------------------- bad bundles


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(b: Path, fn) -> None:
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_manifest_loads_and_describes_the_bundle(bundle: Path) -> None:
    m = load_manifest(bundle, verify_checksums=True)
    assert m.text.num_layers == 2 and m.text.hidden_size == 128
    assert m.image is not None and m.image.num_tokens == np.prod(m.image.grid_thw) // m.image.merge_size**2
    assert m.audio is not None and m.audio.n_mels == 128
    assert {"thinker", "vision", "audio"} <= set(m.components)


def test_bad_bundles_say_what_is_wrong(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(OmniedgeError, match="not found"):
        load_manifest(tmp_path / "nowhere")
    b = _copy(bundle, tmp_path)
    _edit_manifest(b, lambda m: m.update(schema_version=99))
    with pytest.raises(OmniedgeError, match="schema_version 99") as e:
        load_manifest(b)
    assert "upgrade" in (e.value.fix or "")
    _edit_manifest(b, lambda m: m.update(schema_version=1))  # a bundle of an older contract: re-export it
    with pytest.raises(OmniedgeError, match="schema_version 1") as e:
        load_manifest(b)
    assert "re-export" in (e.value.fix or "")
    _edit_manifest(b, lambda m: m.update(schema_version=2))
    load_manifest(b)
    _edit_manifest(b, lambda m: m["thinker_graph"].update(flavour="tensorrt-llm"))
    with pytest.raises(OmniedgeError, match="flavour"):
        load_manifest(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(OmniedgeError, match="not valid JSON"):
        load_manifest(b)


def test_missing_and_damaged_files(bundle: Path, tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    thinker = load_manifest(b).components["thinker"].onnx
    data = thinker.read_bytes()
    thinker.unlink()
    with pytest.raises(OmniedgeError, match="incomplete"):
        load_manifest(b)
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    thinker.write_bytes(bytes(damaged))
    load_manifest(b)  # sizes are fine; only the hash can tell
    if not load_manifest(b).components["thinker"].sha256:
        pytest.skip("the exporter records no checksums")
    with pytest.raises(OmniedgeError, match="damaged"):
        load_manifest(b, verify_checksums=True)
