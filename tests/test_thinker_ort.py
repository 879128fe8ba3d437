"""The ONNX Runtime flavour of the thinker: parity on an odd-size model, float16, the in-place KV cache.

The e2e tests (test_e2e_generate.py) cover the tiny model through both flavours; here: a Qwen3-Omni config
with odd sizes (12 experts top-3, head_dim 48, a vocabulary larger than the tokenizer's), a float16 bundle
(as exported for CUDA) run by ONNX Runtime's CPU kernels, and what IO binding promises: the KV buffer is the
same memory before and after a step, written in place, and the context length is a load-time setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from omniedge.bench.parity import NEAR_TIE, hf_greedy  # noqa: E402
from omniedge.errors import OmniedgeError  # noqa: E402

PROMPT = "What do you see and hear?"
NEW = 10


def _odd_checkpoint(path: Path) -> Path:
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omniedge.checkpoint import save_checkpoint
    from omniedge.models.family import moe_blocks
    from omniedge.models.tiny import _TOKENIZER_TEXT, TINY_VOCAB, tiny_config_dict
    from omniedge.models.tokenizer import special_ids, train_bpe

    tok = train_bpe(_TOKENIZER_TEXT, TINY_VOCAB)
    d = tiny_config_dict(tok.get_vocab_size() + 501, special_ids(tok))  # vocab larger than the tokenizer's
    d["thinker_config"]["text_config"].update(
        num_experts=12, num_experts_per_tok=3, head_dim=48, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(3)
    model = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**d)).eval()
    with torch.no_grad():
        for _, block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 0.5)
    return save_checkpoint(model, tok, path, meta={"model": "odd-size"})


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import default_recipe
    from omniedge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("odd")
    src = _odd_checkpoint(root / "src")
    recipe = default_recipe()
    recipe["calibration"].update(samples=6, max_tokens=96, image_size=64, audio_seconds=1.0)
    ckpt = compress(src, root / "int4", recipe, progress=False)
    return {
        "checkpoint": ckpt,
        "model": load_checkpoint(ckpt)[0],
        "fp32": export_bundle(ckpt, root / "b32", progress=False),
        # float16 as for CUDA, q/k norm separate so ONNX Runtime's CPU kernels can run it here
        "fp16": export_bundle(ckpt, root / "b16", device="cuda", fused_qk_norm=False, progress=False),
    }


def _media(kind: str) -> dict[str, Any]:
    rng = np.random.default_rng(4)
    t = np.arange(int(16000 * 1.3)) / 16000
    return {
        "image": rng.integers(0, 256, (80, 60, 3), dtype=np.uint8) if "image" in kind else None,
        "audio": ((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000) if "audio" in kind else None,
    }


@pytest.mark.parametrize("kind", ["text", "image", "audio", "image+audio"])
def test_odd_size_model_greedy_equals_transformers(odd: dict[str, Any], kind: str) -> None:
    from omniedge.runtime.app import Omni

    with Omni.load(odd["fp32"]) as omni:
        media = _media(kind)
        res = omni.chat(PROMPT, max_new_tokens=NEW, **media)
        ref, _, _ = hf_greedy(
            odd["model"], omni.preprocess(PROMPT, **media), omni.manifest.eos_token_ids, NEW
        )
    assert res.token_ids == ref


@pytest.mark.filterwarnings("ignore:this bundle's thinker is float16")
def test_float16_bundle_follows_transformers_or_splits_at_a_near_tie(odd: dict[str, Any]) -> None:
    from omniedge.runtime.app import Omni

    with Omni.load(odd["fp16"]) as omni:
        assert omni.manifest.thinker.dtype == "float16"
        for kind in ("text", "image+audio"):
            media = _media(kind)
            got = omni.chat(PROMPT, max_new_tokens=NEW, **media).token_ids
            ref, gaps, _ = hf_greedy(
                odd["model"], omni.preprocess(PROMPT, **media), omni.manifest.eos_token_ids, NEW
            )
            diverge = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
            assert diverge is None or gaps[diverge] < NEAR_TIE, (kind, diverge, got, ref)


def test_kv_cache_is_updated_in_place(odd: dict[str, Any]) -> None:
    from omniedge.runtime.app import Omni

    with Omni.load(odd["fp32"], max_context=64) as omni:
        runner = omni.thinker
        key0 = runner.kv[0]
        ptr = key0.data_ptr()
        inputs = omni.thinker_inputs(omni.preprocess(PROMPT))
        seq = inputs.inputs_embeds.shape[1]
        tok = runner.prefill(
            inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds
        ).greedy()
        cache = key0.numpy()
        assert np.abs(cache[:, :, :seq]).sum() > 0 and np.all(cache[:, :, seq:] == 0)
        runner.decode(omni.embed_table[tok], seq + inputs.rope_delta)
        after = key0.numpy()
        assert key0.data_ptr() == ptr and runner.kv[0] is key0  # the same buffer, bound to past and present
        assert np.array_equal(after[:, :, :seq], cache[:, :, :seq]) and np.abs(after[:, :, seq]).sum() > 0
        assert runner.kv_bytes == 2 * omni.manifest.text.num_layers * key0.numpy().nbytes


def test_context_length_is_a_load_setting(odd: dict[str, Any]) -> None:
    from omniedge.runtime.app import Omni

    answers = []
    for ctx in (48, 300):
        with Omni.load(odd["fp32"], max_context=ctx) as omni:
            assert omni.thinker.max_context == ctx
            answers.append(omni.chat(PROMPT, max_new_tokens=6).token_ids)
    assert answers[0] == answers[1]
    with Omni.load(odd["fp32"], max_context=8) as omni, pytest.raises(OmniedgeError, match="context"):
        omni.chat(PROMPT, max_new_tokens=4)


def test_a_graph_variant_shares_the_weights_file(odd: dict[str, Any], tmp_path: Path) -> None:
    """A second graph over the same external data (e.g. the CUDA-only fused q/k norm) lays out identical offsets."""
    import json

    import onnx

    from omniedge.export.thinker_ort import Options, export_thinker_ort
    from omniedge.weights import SafetensorsDir

    bundle = odd["fp32"]
    cfg = json.loads((odd["checkpoint"] / "config.json").read_text())
    variant = bundle / "thinker.variant.onnx"
    try:
        export_thinker_ort(
            SafetensorsDir(odd["checkpoint"]),
            cfg,
            variant,
            1,
            Options(),
            progress=False,
            data_of=bundle / "thinker.onnx",
        )

        def layout(path: Path) -> dict[str, tuple[str, ...]]:
            g = onnx.load(str(path), load_external_data=False).graph
            return {t.name: tuple(e.value for e in t.external_data) for t in g.initializer}

        assert layout(variant) == layout(bundle / "thinker.onnx")
        assert not (bundle / "thinker.variant.onnx.data").exists()
    finally:
        variant.unlink(missing_ok=True)


def test_logits_of_a_step_stay_what_they_were(odd: dict[str, Any]) -> None:
    """A step's logits are the caller's copy: the next step writes into the same bound output buffer."""
    from omniedge.runtime.app import Omni

    with Omni.load(odd["fp32"]) as omni:
        inputs = omni.thinker_inputs(omni.preprocess(PROMPT))
        first = omni.thinker.prefill(
            inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds
        )
        kept = first.logits()
        snapshot = kept.copy()
        omni.thinker.decode(omni.embed_table[int(kept.argmax())], inputs.ids.size + inputs.rope_delta)
        assert np.array_equal(kept, snapshot)


def test_zero_points_groups_and_per_layer_experts_export_equal_transformers(
    odd: dict[str, Any], tmp_path: Path
) -> None:
    """A checkpoint with per-group zero points or a smaller group, pruned to a different expert count per
    layer (global budget), exports to the ORT flavour and generates transformers' greedy tokens; the
    portable flavour refuses what it cannot unpack."""
    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import default_recipe
    from omniedge.export.bundle import export_bundle
    from omniedge.runtime.app import Omni

    recipe = default_recipe()
    recipe["stages"] = [
        {"prune": {"method": "random", "seed": 1, "keep_ratio": 0.5, "budget": "global"}},  # 7 + 5 experts
        {
            "quantize": {"method": "rtn", "group_size": 64, "symmetric": False}
        },  # MatMulNBits input 3, QMoE 11/12
    ]
    recipe["calibration"].update(samples=6, max_tokens=96, image_size=64, audio_seconds=1.0)
    src = Path(odd["checkpoint"]).parent / "src"
    ckpt = compress(src, tmp_path / "ckpt", recipe, progress=False)
    counts = __import__("json").loads((ckpt / "config.json").read_text())["thinker_config"]["text_config"]
    assert len(set(counts["omniedge_experts_per_layer"])) == 2  # the budget moved experts between layers
    model = load_checkpoint(ckpt)[0]
    bundle = export_bundle(ckpt, tmp_path / "bundle", progress=False)
    with Omni.load(bundle) as omni:
        for kind in ("text", "image+audio"):
            media = _media(kind)
            res = omni.chat(PROMPT, max_new_tokens=NEW, **media)
            ref, _, _ = hf_greedy(model, omni.preprocess(PROMPT, **media), omni.manifest.eos_token_ids, NEW)
            assert res.token_ids == ref, kind
    with pytest.raises(OmniedgeError, match="portable") as err:
        export_bundle(ckpt, tmp_path / "portable", flavour="portable", progress=False)
    assert "--flavour ort" in (err.value.fix or "")
    assert not (tmp_path / "portable").exists()


def test_a_cuda_export_fuses_the_qk_norm_and_a_cpu_session_says_so(
    odd: dict[str, Any], tmp_path: Path
) -> None:
    """`--device cuda` defaults to the fused q/k norm (q/k/v packed into GroupQueryAttention, no Split, no
    separate norms); ONNX Runtime's CPU kernel cannot run it, so the runtime refuses it on the CPU with the fix,
    and asking for the fused graph on the CPU is refused at export."""
    import onnx

    from omniedge.export.bundle import export_bundle
    from omniedge.runtime.app import Omni

    bundle = export_bundle(odd["checkpoint"], tmp_path / "gpu", device="cuda", progress=False)
    ops = [n.op_type for n in onnx.load(str(bundle / "thinker.onnx"), load_external_data=False).graph.node]
    assert "Split" not in ops and "SimplifiedLayerNormalization" in ops  # only the first layer's input norm
    assert ops.count("SimplifiedLayerNormalization") == 1
    gqa = [
        n
        for n in onnx.load(str(bundle / "thinker.onnx"), load_external_data=False).graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    assert all(n.input[1] == "" and n.input[2] == "" and len(n.input) >= 14 for n in gqa)
    manifest = (bundle / "manifest.json").read_text()
    assert '"fused_qk_norm": true' in manifest and "CUDAExecutionProvider" in manifest
    with pytest.raises(OmniedgeError, match="built for CUDAExecutionProvider"):
        Omni.load(bundle).chat(PROMPT, max_new_tokens=2)
    with pytest.raises(OmniedgeError, match="CUDA only"):
        export_bundle(odd["checkpoint"], tmp_path / "cpu", device="cpu", fused_qk_norm=True, progress=False)


@pytest.mark.parametrize("kind", ["text", "image+audio"])
def test_a_prompt_prefilled_in_pieces_answers_as_a_whole(odd: dict[str, Any], kind: str) -> None:
    """`prefill_chunk`: each piece attends to the cache the earlier pieces wrote (M-RoPE rows, deepstack rows
    and the image's positions cut with it); the greedy answer equals transformers' and the prompt's last
    logits equal the one-piece prefill's."""
    from omniedge.runtime.app import Omni

    media = _media(kind)
    with Omni.load(odd["fp32"]) as whole, Omni.load(odd["fp32"], prefill_chunk=5) as pieces:
        prompt = whole.preprocess(PROMPT, **media)
        inputs = whole.thinker_inputs(prompt)
        assert inputs.inputs_embeds.shape[1] > 3 * 5  # several pieces, the last one partial or not
        ref_logits = whole.thinker.prefill(
            inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds
        ).logits()
        got_logits = pieces.thinker.prefill(
            inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds
        ).logits()
        assert np.abs(got_logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
        got = pieces.chat(PROMPT, max_new_tokens=NEW, **media).token_ids
    ref, _, _ = hf_greedy(odd["model"], prompt, whole.manifest.eos_token_ids, NEW)
    assert got == ref


@pytest.mark.parametrize("kind", ["text", "image+audio"])
def test_a_prompt_padded_to_fixed_lengths_answers_as_a_whole(odd: dict[str, Any], kind: str) -> None:
    """`prefill_buckets` (what the runtime does on CUDA): pieces of the largest length, the last padded with
    zeros after the prompt's last token; the prompt's logits equal the whole prefill's, and the decode steps
    that overwrite the pads' cache rows give transformers' greedy answer."""
    from omniedge.runtime.app import Omni

    media = _media(kind)
    with Omni.load(odd["fp32"]) as whole:
        prompt = whole.preprocess(PROMPT, **media)
        inputs = whole.thinker_inputs(prompt)
        seq = inputs.inputs_embeds.shape[1]
        big = 8 if seq % 8 else 7
        buckets = (min(seq % big + 2, big), big)  # the last piece is padded by 2 (or up to `big`)
        args = (inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds)
        ref_logits = whole.thinker.prefill(*args).logits()
        with Omni.load(odd["fp32"], prefill_buckets=buckets) as padded:
            plan = padded.thinker.pieces(seq)
            assert len(plan) >= 2 and plan[-1][2] > plan[-1][1] - plan[-1][0]
            got_logits = padded.thinker.prefill(*args).logits()
            assert np.abs(got_logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
            got = padded.chat(PROMPT, max_new_tokens=NEW, **media).token_ids
    ref, _, _ = hf_greedy(odd["model"], prompt, whole.manifest.eos_token_ids, NEW)
    assert got == ref


def test_piece_lengths_beyond_the_context_are_dropped(odd: dict[str, Any]) -> None:
    """A piece length the cache cannot hold is never warmed up or used: the pieces are the lengths that fit."""
    from omniedge.runtime.app import Omni

    with Omni.load(odd["fp32"], max_context=40, prefill_buckets=(8, 32, 64)) as omni:
        assert omni.thinker.prefill_buckets == (8, 32)
        assert omni.thinker.pieces(39) == [(0, 32, 32), (32, 39, 8)]


def test_prefill_chunk_must_be_positive(odd: dict[str, Any]) -> None:
    from omniedge.runtime.app import Omni

    with pytest.raises(OmniedgeError, match="prefill_chunk"):
        Omni.load(odd["fp32"], prefill_chunk=0)


def test_an_int4_lm_head_is_stored_packed_reloads_and_exports(tmp_path: Path) -> None:
    """`targets: [attention, experts, lm_head]`: the head is packed INT4 (no float copy), only the quantize
    stage is scored with it, transformers reloads it as an INT4 Linear, and both exported flavours answer
    with transformers' greedy tokens on that checkpoint."""
    import json

    from safetensors import safe_open

    from omniedge.checkpoint import load_checkpoint
    from omniedge.compress.pipeline import compress
    from omniedge.compress.recipe import default_recipe
    from omniedge.export.bundle import export_bundle
    from omniedge.int4_modules import Int4Linear
    from omniedge.runtime.app import Omni

    src = _odd_checkpoint(tmp_path / "src")
    recipe = default_recipe()
    recipe["stages"] = [{"quantize": {"method": "gptq", "targets": ["attention", "experts", "lm_head"]}}]
    recipe["calibration"].update(samples=8, max_tokens=96, image_size=64, audio_seconds=1.0)
    ckpt = compress(src, tmp_path / "int4", recipe, progress=False)
    cfg = json.loads((ckpt / "config.json").read_text())["omniedge_quantization"]
    assert "thinker.lm_head.weight" in cfg["modules"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "thinker.lm_head.weight" not in set(f.keys())  # no float copy
    meta = json.loads((ckpt / "omniedge.json").read_text())
    assert meta["stages"][0]["result"]["lm_head_method"] == "rtn"  # GPTQ has no calibration inputs for it
    model = load_checkpoint(ckpt)[0]
    assert isinstance(model.thinker.lm_head, Int4Linear)
    for flavour in ("ort", "portable"):
        bundle = export_bundle(ckpt, tmp_path / flavour, flavour=flavour, progress=False)
        with Omni.load(bundle) as omni:
            prompt = omni.preprocess(PROMPT)
            got = omni.chat(PROMPT, max_new_tokens=NEW).token_ids
        ref, _, _ = hf_greedy(model, prompt, omni.manifest.eos_token_ids, NEW)
        assert got == ref, flavour
    import onnx

    heads = [
        n
        for n in onnx.load(str(tmp_path / "ort" / "thinker.onnx"), load_external_data=False).graph.node
        if n.name == "lm_head"
    ]
    assert heads and heads[0].op_type == "MatMulNBits"


def test_runners_on_one_session_get_their_own_decode_graph(odd: dict[str, Any]) -> None:
    """Each runner made on a session binds its own buffers, so each gets its own CUDA-graph id (a second
    runner replaying the first one's graph would read the first one's buffers); a new session starts over.
    The warm-up is a GPU matter: never on the CPU."""
    from omniedge.runtime.backends import OrtBackend
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import make_thinker

    m = load_manifest(odd["fp32"])
    backend = OrtBackend("thinker", m.components["thinker"].onnx)
    backend.load()
    first, second = make_thinker(m, backend, 64), make_thinker(m, backend, 64)
    assert (first.graph_id, second.graph_id) == (1, 2)
    assert not first.warm_up_at_load and not second.warm_up_at_load
    backend.unload()
    backend.load()
    assert make_thinker(m, backend, 64).graph_id == 1


def test_a_prompt_without_images_binds_resident_zero_deepstack(odd: dict[str, Any]) -> None:
    """All-zero deepstack features (no image) give the same logits as passing none, through one resident zero
    buffer bound at each piece's width; any nonzero feature still reaches the graph."""
    from omniedge.runtime.app import Omni

    with Omni.load(odd["fp32"], prefill_buckets=(4, 8)) as omni:
        th = omni.thinker
        inputs = omni.thinker_inputs(omni.preprocess(PROMPT))
        emb, pos, deep = inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds
        assert th.num_deepstack > 0 and deep.shape[0] == th.num_deepstack and not deep.any()
        a = th.prefill(emb, pos, deep).logits()
        assert th._zero_deep_width == 8  # grown to the widest piece, bound narrower for the last
        b = th.prefill(emb, pos, None).logits()
        assert np.array_equal(a, b)
        bumped = deep.copy()
        bumped[:, :, 2] = 0.5
        c = th.prefill(emb, pos, bumped).logits()
        assert np.abs(c - a).max() > 1e-3 * np.abs(a).max()


def test_prompts_are_embedded_in_the_graphs_input_type(odd: dict[str, Any]) -> None:
    from omniedge.runtime.manifest import load_manifest

    for bundle, want in ((odd["fp32"], np.float32), (odd["fp16"], np.float16)):
        m = load_manifest(bundle)
        assert np.dtype(m.thinker.input_dtype) == want
