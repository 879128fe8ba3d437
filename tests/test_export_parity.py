"""Exported graphs (run by onnxruntime CPU) against transformers' own modules on the same weights.

The tiny model gets random biases and norm weights first: transformers initialises them to 0 and 1,
which would hide a missing bias or a wrong padding. Two bundles are exported once per module: the float
checkpoint and an INT4 one (RTN via omniedge.compress.int4, dequantized weights in model.safetensors,
packed ones in int4.safetensors, as docs/artifacts.md §1 says).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from omniedge.checkpoint import file_sha256, load_checkpoint, save_checkpoint  # noqa: E402
from omniedge.errors import OmniedgeError  # noqa: E402
from omniedge.export.audio import conv_tokens  # noqa: E402
from omniedge.export.bundle import export_bundle  # noqa: E402
from omniedge.export.thinker import io_names  # noqa: E402
from omniedge.export.vision import check_image_size, default_image_size  # noqa: E402
from omniedge.models.family import thinker_parts  # noqa: E402
from omniedge.weights import canonical_name  # noqa: E402

TOL = 1e-3  # max |ours - transformers| / max |transformers|, fp32
FLAVOURS = ("fp32", "int4")


def rel_err(ours: np.ndarray, ref: Any) -> float:
    ref = ref.detach().float().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------- checkpoints and bundles


def _tiny_with_real_biases() -> tuple[Any, Any]:
    from omniedge.models.tiny import build_tiny

    model, tok = build_tiny(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.2)
    return model, tok


def _quantized(name: str) -> bool:
    """Text linears, fused experts and lm_head (as the INT4 stage does), plus one audio and one vision
    linear so every graph's INT4 path runs (audio fc1 has K = 64: exercises K padding to a block)."""
    n = canonical_name(name)
    text = n.startswith("thinker.model.layers.") and n.endswith(
        ("proj.weight", "experts.gate_up_proj", "experts.down_proj")
    )
    extra = n in (
        "thinker.lm_head.weight",
        "thinker.audio_tower.layers.0.fc1.weight",
        "thinker.visual.merger.mlp.0.weight",
    )
    return text or extra


def _write_int4(model: Any, tok: Any, path: Path) -> list[str]:
    from safetensors.torch import save_file

    from omniedge.int4 import dequantize, quantize

    packed: dict[str, Any] = {}
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _quantized(name):
                q, s = quantize(p.data)
                p.copy_(dequantize(q, s, p.shape[-1]))
                packed[f"{name}.qweight"], packed[f"{name}.scales"] = q, s
                names.append(name)

    def writer(tmp: Path) -> None:
        save_file(packed, str(tmp / "int4.safetensors"))
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["omniedge_quantization"] = {
            "method": "rtn",
            "bits": 4,
            "group_size": 128,
            "symmetric": True,
            "zero_point": 8,
            "file": "int4.safetensors",
            "modules": names,
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))

    save_checkpoint(model, tok, path, meta={"model": "tiny-int4-test"}, extra_files={"int4": writer})
    return names


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    model, tok = _tiny_with_real_biases()
    save_checkpoint(model, tok, root / "fp32", meta={"model": "tiny-test"})
    _write_int4(model, tok, root / "int4")
    return {"fp32": root / "fp32", "int4": root / "int4"}


@pytest.fixture(scope="module")
def bundles(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles keyed "fp32"/"int4" (ORT thinker flavour, the default) and "fp32-portable"/"int4-portable"."""
    root = tmp_path_factory.mktemp("bundle")
    out = {k: export_bundle(checkpoints[k], root / k, progress=False) for k in FLAVOURS}
    for k in FLAVOURS:
        out[f"{k}-portable"] = export_bundle(
            checkpoints[k], root / f"{k}-p", flavour="portable", progress=False
        )
    return out


@pytest.fixture(scope="module")
def refs(checkpoints: dict[str, Path]) -> dict[str, Any]:
    """transformers' models, loaded from the same checkpoints the bundles came from."""
    return {k: load_checkpoint(checkpoints[k])[0] for k in FLAVOURS}


def _session(bundle: Path, name: str) -> Any:
    return ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


# ---------------------------------------------------------------- vision


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_vision_matches_transformers(flavour: str, bundles: dict[str, Path], refs: dict[str, Any]) -> None:
    visual = thinker_parts(refs[flavour]).visual
    img = _manifest(bundles[flavour])["preprocess"]["image"]
    grid = img["grid_thw"]
    x = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(2))
    image_embeds, deepstack = _session(bundles[flavour], "vision").run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = visual(x, grid_thw=torch.tensor([grid]))
    errs = (
        rel_err(image_embeds, ref.pooler_output),
        rel_err(deepstack, torch.stack(list(ref.deepstack_features))),
    )
    print(f"vision {flavour}: image_embeds {errs[0]:.1e}, deepstack {errs[1]:.1e}")
    assert image_embeds.shape[0] == img["num_tokens"]
    assert max(errs) <= TOL


# ---------------------------------------------------------------- audio


def _audio_inputs(
    feats: np.ndarray, chunk_frames: int, n_window: int = 50, n_window_infer: int = 800
) -> dict:
    """The audio graph's inputs for one clip, chunks padded to `chunk_frames` (transformers pads every
    chunk to the longest one: 2*n_window, or the clip's own length when it is shorter than a chunk)."""
    n_mels, frames = feats.shape
    full = 2 * n_window
    lengths = [min(full, frames - s) for s in range(0, frames, full)]
    padded = np.zeros((len(lengths), n_mels, chunk_frames), np.float32)
    for i, n in enumerate(lengths):
        padded[i, :, :n] = feats[:, i * full : i * full + n]
    per = conv_tokens(chunk_frames)
    valid = np.concatenate([np.arange(conv_tokens(n)) + i * per for i, n in enumerate(lengths)])
    window = conv_tokens(full) * (n_window_infer // full)
    return {
        "padded_features": padded,
        "valid_indices": valid.astype(np.int64),
        "window_ids": (np.arange(valid.size) // window).astype(np.int64),
    }


def _audio_ref(tower: Any, feats: np.ndarray) -> Any:
    with torch.no_grad():
        return tower(torch.from_numpy(feats), feature_lens=torch.tensor([feats.shape[1]])).last_hidden_state


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("seconds", [0.61, 2.5, 10.9])
def test_audio_matches_transformers(
    flavour: str, seconds: float, bundles: dict[str, Path], refs: dict[str, Any]
) -> None:
    tower = thinker_parts(refs[flavour]).audio_tower
    frames = round(seconds * 100)  # 100 mel frames per second
    feats = np.random.default_rng(3).standard_normal((128, frames)).astype(np.float32)
    inputs = _audio_inputs(feats, chunk_frames=min(frames, 100))
    (ours,) = _session(bundles[flavour], "audio").run(None, inputs)
    ref = _audio_ref(tower, feats)
    assert ours.shape[0] == conv_tokens(frames % 100 or 100) + (frames - 1) // 100 * 13
    err = rel_err(ours, ref)
    print(f"audio {flavour} {seconds} s: {err:.1e}")
    assert err <= TOL


def test_audio_padding_to_full_chunk_is_close_not_exact(
    bundles: dict[str, Path], refs: dict[str, Any]
) -> None:
    """The claim 'padding a short clip to 2*n_window changes nothing' is only approximately true: with
    non-zero conv biases, padded frames reach the last valid tokens through the conv stack (gelu(bias)
    where transformers sees the conv's own zero padding). Pad to the clip's length for exactness."""
    tower = thinker_parts(refs["fp32"]).audio_tower
    feats = np.random.default_rng(4).standard_normal((128, 61)).astype(np.float32)
    ref = _audio_ref(tower, feats)
    sess = _session(bundles["fp32"], "audio")
    (exact,) = sess.run(None, _audio_inputs(feats, chunk_frames=61))
    (full,) = sess.run(None, _audio_inputs(feats, chunk_frames=100))
    err_exact, err_full = rel_err(exact, ref), rel_err(full, ref)
    print(f"<1 s clip: padded to its length {err_exact:.1e}, padded to 100 frames {err_full:.1e}")
    assert err_exact <= 1e-5
    assert err_exact < err_full <= TOL


# ---------------------------------------------------------------- thinker


def _prompt(special: dict[str, int], n_image: int, n_audio: int) -> np.ndarray:
    s = special
    return np.array(
        [s["im_start"], s["user"], 11, 12, 13]
        + [s["vision_start"]] + [s["image_pad"]] * n_image + [s["vision_end"]]
        + [s["audio_start"]] + [s["audio_pad"]] * n_audio + [s["audio_end"]]
        + [14, 15, s["im_end"], s["im_start"], s["assistant"]],
        dtype=np.int64,
    )  # fmt: skip


class _TextInputs:
    """Records what the thinker hands its text model (position ids), whatever the transformers release."""

    def __init__(self, text_model: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = text_model.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, _m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append(dict(kwargs))


def _thinker_feed(
    m: dict[str, Any], embeds: np.ndarray, pos: np.ndarray, deep: np.ndarray, past: list[np.ndarray] | None
) -> dict:
    t = m["text"]
    names, _ = io_names(t["num_layers"])
    if past is None:
        past = [np.zeros((1, t["num_kv_heads"], 0, t["head_dim"]), np.float32)] * (2 * t["num_layers"])
    return dict(zip(names, [embeds, pos, deep, *past], strict=True))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("graph", ["ort", "portable"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_thinker_prefill_and_decode_match_transformers(
    flavour: str, graph: str, bundles: dict[str, Path], refs: dict[str, Any]
) -> None:
    """The whole path: ORT vision + audio outputs spliced into the prompt's embeddings, ORT thinker
    prefill then one decode step with its KV cache, against transformers' thinker doing all of it."""
    bundle = bundles[flavour if graph == "ort" else f"{flavour}-portable"]
    model = refs[flavour]
    parts = thinker_parts(model)
    m = _manifest(bundle)
    special, img = m["special_tokens"], m["preprocess"]["image"]
    rng = torch.Generator().manual_seed(5)
    grid = img["grid_thw"]
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 1536, generator=rng)
    frames = 250
    feats = torch.randn(128, frames, generator=rng)
    n_audio = conv_tokens(50) + 2 * 13
    ids = _prompt(special, img["num_tokens"], n_audio)

    # transformers: prefill with cache, then one greedy token
    rec = _TextInputs(parts.text_model)
    with torch.no_grad():
        out = parts.thinker(
            input_ids=torch.from_numpy(ids)[None],
            attention_mask=torch.ones(1, ids.size, dtype=torch.long),
            pixel_values=pixels,
            image_grid_thw=torch.tensor([grid]),
            input_features=feats[None],
            feature_attention_mask=torch.ones(1, frames, dtype=torch.long),
            use_cache=True,
        )
        cache = getattr(out, "past_key_values", None) or out.cache
        nxt = int(out.logits[0, -1].argmax())
        out2 = parts.thinker(
            input_ids=torch.tensor([[nxt]]),
            past_key_values=cache,  # no attention_mask: with one, 5.2x recomputes positions for all tokens
            use_cache=True,
        )
    rec.handle.remove()
    pos_prefill, pos_decode = (c["position_ids"].numpy().astype(np.int64) for c in rec.calls)

    # ours: numpy embeddings + ORT encoders + ORT thinker
    embed = np.load(bundle / "embed_tokens.npy")
    image_embeds, deep_img = _session(bundle, "vision").run(None, {"pixel_values": pixels.numpy()})
    (audio_embeds,) = _session(bundle, "audio").run(None, _audio_inputs(feats.numpy(), 100))
    x = embed[ids].copy()
    img_pos = ids == special["image_pad"]
    x[img_pos] = image_embeds
    x[ids == special["audio_pad"]] = audio_embeds
    deep = np.zeros((m["text"]["num_deepstack"], 1, ids.size, x.shape[-1]), np.float32)
    deep[:, 0, img_pos] = deep_img
    if graph == "ort":
        _ort_thinker_matches(bundle, x, pos_prefill, deep, embed[nxt], int(pos_decode[0, 0, 0]), out, out2)
        return
    thinker = _session(bundle, "thinker")
    outs = thinker.run(None, _thinker_feed(m, x[None], pos_prefill, deep, None))
    err_prefill = rel_err(outs[0], out.logits)
    print(f"thinker {flavour}: prefill logits {err_prefill:.1e}")
    assert err_prefill <= TOL

    deep1 = np.zeros((m["text"]["num_deepstack"], 1, 1, x.shape[-1]), np.float32)
    outs2 = thinker.run(None, _thinker_feed(m, embed[[nxt]][None], pos_decode, deep1, outs[1:]))
    err_decode = rel_err(outs2[0], out2.logits)
    print(f"thinker {flavour}: decode logits {err_decode:.1e}")
    assert err_decode <= TOL
    assert outs2[1].shape[2] == ids.size + 1  # present = past + seq
    layer0 = getattr(cache, "layers", [None])[0]
    if layer0 is not None and getattr(layer0, "keys", None) is not None:
        assert rel_err(outs2[1], layer0.keys) <= TOL


def _ort_thinker_matches(
    bundle: Path, x: np.ndarray, pos: np.ndarray, deep: np.ndarray, row: np.ndarray, position: int, out, out2
) -> None:
    """The ORT flavour through the runtime's own runner: KV buffer bound in place, rotary from tables."""
    from omniedge.runtime.backends import OrtBackend
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import OrtThinker, make_thinker

    m = load_manifest(bundle)
    runner = make_thinker(m, OrtBackend("thinker", m.components["thinker"].onnx), max_context=96)
    assert isinstance(runner, OrtThinker)
    first = runner.prefill(x[None], pos[:, 0, :], deep)
    err_prefill = rel_err(first.logits(), out.logits[0, -1])
    assert first.greedy() == int(out.logits[0, -1].argmax())
    second = runner.decode(row, position)
    err_decode = rel_err(second.logits(), out2.logits[0, -1])
    print(f"thinker ort: prefill logits {err_prefill:.1e}, decode logits {err_decode:.1e}")
    assert err_prefill <= TOL and err_decode <= TOL
    assert runner.cache_len == x.shape[0] + 1


# ---------------------------------------------------------------- INT4 stays INT4


def test_int4_graphs_hold_no_float_copies(bundles: dict[str, Path], refs: dict[str, Any]) -> None:
    from onnx import numpy_helper

    model = refs["int4"]  # its float weights are the dequantized INT4 ones
    quantized = [p.detach().numpy() for n, p in model.named_parameters() if _quantized(n)]
    candidates = {}
    for w in quantized:
        for v in (w, np.swapaxes(w, -1, -2)):
            candidates.setdefault(v.shape, []).append(v)
    counts: dict[str, int] = {}
    for name in ("vision", "audio", "thinker", "thinker-portable"):
        path = (
            bundles["int4-portable" if name.endswith("portable") else "int4"] / f"{name.split('-')[0]}.onnx"
        )
        g = onnx.load(str(path)).graph
        for t in g.initializer:
            if t.data_type == onnx.TensorProto.FLOAT and tuple(t.dims) in candidates:
                a = numpy_helper.to_array(t)
                assert not any(np.array_equal(a, w) for w in candidates[a.shape]), (
                    f"{name}: float copy {t.name}"
                )
        assert any(t.data_type == onnx.TensorProto.UINT8 for t in g.initializer)
        counts[name] = sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in g.node)
        if name == "thinker":  # the ORT flavour: one QMoE per MoE layer, one GroupQueryAttention per layer
            assert sum(n.op_type == "QMoE" for n in g.node) == sum(
                n.op_type == "GroupQueryAttention" for n in g.node
            )
    text_layers = 2
    # per text layer q, k, v, o (the ORT flavour fuses q/k/v into one); plus lm_head; one vision and one audio linear
    assert counts == {
        "vision": 1,
        "audio": 1,
        "thinker": 2 * text_layers + 1,
        "thinker-portable": 4 * text_layers + 1,
    }
    m32, m4 = _manifest(bundles["fp32-portable"]), _manifest(bundles["int4-portable"])
    w32, w4 = m32["components"]["thinker"]["weight_bytes"], m4["components"]["thinker"]["weight_bytes"]
    assert w4 < 0.4 * w32, (w4, w32)  # the tiny thinker is nearly all quantized matrices
    assert m4["model"]["quantization"]["exported_as_float"] == []
    assert m32["model"]["quantization"] is None
    o32, o4 = _manifest(bundles["fp32"]), _manifest(bundles["int4"])
    assert o4["components"]["thinker"]["weight_bytes"] < 0.4 * o32["components"]["thinker"]["weight_bytes"]


def test_matmul_nbits_without_zero_points_means_eight() -> None:
    """ORT's MatMulNBits with no zero_points input must decode (q - 8) * scale: our packing's meaning."""
    from onnx import TensorProto, helper, numpy_helper

    from omniedge.int4 import dequantize, quantize

    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(6))
    q, s = quantize(w)
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=200, N=24, bits=4, block_size=128
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 200])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(q.numpy(), "B"), numpy_helper.from_array(s.numpy().reshape(-1), "S")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads up to 13
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).standard_normal((3, 200)).astype(np.float32)
    ref = x @ dequantize(q, s, 200).numpy().T
    assert np.abs(sess.run(None, {"x": x})[0] - ref).max() <= 1e-4 * np.abs(ref).max()


# ---------------------------------------------------------------- the bundle contract


def test_manifest_follows_the_contract(bundles: dict[str, Path]) -> None:
    b = bundles["fp32"]
    m = _manifest(b)
    assert m["schema_version"] == 2 and m["tokenizer"] == "tokenizer.json"
    assert m["eos_token_ids"] == [m["special_tokens"]["im_end"], m["special_tokens"]["endoftext"]]
    emb = np.load(b / "embed_tokens.npy", mmap_mode="r")
    assert (
        list(emb.shape) == m["embed_tokens"]["shape"] == [m["text"]["vocab_size"], m["text"]["hidden_size"]]
    )
    c = m["components"]
    ins = {k: [(i["name"], i["shape"], i["dtype"]) for i in v["inputs"]] for k, v in c.items()}
    outs = {k: [(o["name"], o["shape"], o["dtype"]) for o in v["outputs"]] for k, v in c.items()}
    assert ins["vision"] == [("pixel_values", [16, 1536], "float32")]
    assert outs["vision"] == [
        ("image_embeds", [4, 128], "float32"),
        ("deepstack_embeds", [1, 4, 128], "float32"),
    ]
    assert ins["audio"] == [
        ("padded_features", ["num_chunks", 128, "chunk_frames"], "float32"),
        ("valid_indices", ["num_tokens"], "int64"),
        ("window_ids", ["num_tokens"], "int64"),
    ]
    assert outs["audio"] == [("audio_embeds", ["num_tokens", 128], "float32")]
    assert ins["thinker"][:8] == [
        ("inputs_embeds", [1, "seq", 128], "float32"),
        ("deepstack_embeds", [1, 1, "seq", 128], "float32"),
        ("position_ids", [1, "seq"], "int64"),
        ("cos_cache", ["rope_rows", 16], "float32"),
        ("sin_cache", ["rope_rows", 16], "float32"),
        ("seqlens_k", [1], "int32"),
        ("total_sequence_length", [], "int32"),
        ("logits_index", [1], "int64"),
    ]
    assert ins["thinker"][8] == ("past_key_values.0.key", [1, 2, "max_context", 32], "float32")
    assert outs["thinker"][:2] == [
        ("logits", [1, m["text"]["vocab_size"]], "float32"),
        ("next_token", [1], "int64"),
    ]
    assert outs["thinker"][-1] == ("present.1.value", [1, 2, "max_context", 32], "float32")
    g = m["thinker_graph"]
    assert g["flavour"] == "ort" and g["dtype"] == "float32" and g["providers"] == []
    assert len(g["rope"]["inv_freq"]) == len(g["rope"]["axis"]) == 16
    p = _manifest(bundles["fp32-portable"])
    pins = [(i["name"], i["shape"]) for i in p["components"]["thinker"]["inputs"]]
    assert pins[:4] == [
        ("inputs_embeds", [1, "seq", 128]),
        ("position_ids", [3, 1, "seq"]),
        ("deepstack_embeds", [1, 1, "seq", 128]),
        ("past_key_values.0.key", [1, 2, "past", 32]),
    ]
    pouts = [(o["name"], o["shape"]) for o in p["components"]["thinker"]["outputs"]]
    assert pouts[0] == ("logits", [1, "seq", m["text"]["vocab_size"]])
    assert pouts[-1] == ("present.1.value", [1, 2, "past + seq", 32])
    assert p["thinker_graph"]["flavour"] == "portable"
    for comp in c.values():
        for fname, digest in comp["sha256"].items():
            assert file_sha256(b / fname) == digest
        assert comp["weight_bytes"] > 0
    assert not [p.name for p in b.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_runtime_reads_the_manifest(bundles: dict[str, Path]) -> None:
    manifest = pytest.importorskip("omniedge.runtime.manifest")
    m = manifest.load_manifest(bundles["int4"], verify_checksums=True)
    assert set(m.components) == {"vision", "audio", "thinker"}
    assert m.image is not None and m.image.num_tokens == 4


def test_default_image_size_rule() -> None:
    real = SimpleNamespace(patch_size=16, spatial_merge_size=2, num_position_embeddings=2304)
    tiny = SimpleNamespace(patch_size=16, spatial_merge_size=2, num_position_embeddings=64)
    assert default_image_size(real) == 448 and default_image_size(tiny) == 64
    assert check_image_size(96, tiny) == 96
    with pytest.raises(OmniedgeError, match="multiple of patch\\*merge = 32"):
        check_image_size(50, tiny)


# ---------------------------------------------------------------- bad input


def test_not_a_checkpoint_is_an_omniedge_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OmniedgeError, match="not a checkpoint"):
        export_bundle(tmp_path, tmp_path / "bundle")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OmniedgeError, match="not valid JSON"):
        export_bundle(tmp_path, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_damaged_checkpoints_are_omniedge_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "truncated"
    shutil.copytree(checkpoints["fp32"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(OmniedgeError, match="not a readable safetensors"):
        export_bundle(broken, tmp_path / "b1")

    no_int4 = tmp_path / "no_int4"
    shutil.copytree(checkpoints["int4"], no_int4)
    (no_int4 / "int4.safetensors").unlink()
    with pytest.raises(OmniedgeError, match=r"no int4\.safetensors"):
        export_bundle(no_int4, tmp_path / "b2")

    with pytest.raises(OmniedgeError, match="multiple of patch"):
        export_bundle(checkpoints["fp32"], tmp_path / "b3", image_size=70)
    assert not any((tmp_path / b).exists() for b in ("b1", "b2", "b3"))
