"""The tiny reference model: the real Qwen3-Omni thinker architecture at toy size, random weights.

For structure and parity tests: every stage reads it from disk like a real checkpoint. Every weight
matrix the INT4 stage touches has an input width of 128, so group-128 quantization is exercised whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A fixed text to train the tiny tokenizer on: content is irrelevant for random weights, determinism is not.
_TOKENIZER_TEXT = [
    "omniedge runs a multimodal mixture of experts model on a small robot computer.",
    "The robot looks at the picture, listens to the question and answers in a few words.",
    "A kiosk hears a visitor, sees the camera image and replies with text and speech.",
    "Red circle, blue square, green triangle: count the shapes and say where they are.",
    "Experts are pruned, the student is distilled, weights are quantized to four bits.",
    "Hello, what do you see? I see a cat on a chair next to a cup of coffee.",
] * 4

TINY_VOCAB = 512


def tiny_config_dict(vocab_size: int, special: dict[str, int]) -> dict[str, Any]:
    """Kwargs for Qwen3OmniMoeConfig; `special` maps token names (family.SPECIAL_TOKENS, roles) to ids."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000,
            "mrope_section": [4, 6, 6],
            "interleaved": True,
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
    )
    audio = dict(
        num_mel_bins=128,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        d_model=64,
        output_dim=128,
        n_window=50,
        n_window_infer=800,
        conv_chunksize=500,
        downsample_hidden_size=32,
        max_source_positions=1500,
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=128,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    return thinker_only_config(text, audio, vision, special)


def thinker_only_config(
    text: dict[str, Any], audio: dict[str, Any], vision: dict[str, Any], special: dict[str, int]
) -> dict[str, Any]:
    """A Qwen3OmniMoeConfig without speech output, with token ids taken from our tokenizer."""
    thinker = dict(
        text_config=text,
        audio_config=audio,
        vision_config=vision,
        audio_token_id=special["audio_pad"],
        image_token_id=special["image_pad"],
        video_token_id=special["video_pad"],
        audio_start_token_id=special["audio_start"],
        audio_end_token_id=special["audio_end"],
        vision_start_token_id=special["vision_start"],
        vision_end_token_id=special["vision_end"],
        user_token_id=special["user"],
        position_id_per_seconds=13,
        seconds_per_chunk=2,
    )
    return dict(
        thinker_config=thinker,
        enable_audio_output=False,
        im_start_token_id=special["im_start"],
        im_end_token_id=special["im_end"],
        system_token_id=special["system"],
        user_token_id=special["user"],
        assistant_token_id=special["assistant"],
    )


def build_tiny(seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) in memory, fp32, eval mode, deterministic for a seed."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omniedge.models.tokenizer import special_ids, train_bpe

    tok = train_bpe(_TOKENIZER_TEXT, TINY_VOCAB)
    cfg = Qwen3OmniMoeConfig(**tiny_config_dict(tok.get_vocab_size(), special_ids(tok)))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(cfg).eval()
    # Random init leaves routers at zero (every expert ties); give them weights so routing is real.
    from omniedge.models.family import moe_blocks

    with torch.no_grad():
        for _, block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 0.5)
    return model, tok


def write_tiny(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model as an HF checkpoint directory (atomically) and return its path."""
    from omniedge.checkpoint import save_checkpoint

    model, tok = build_tiny(seed)
    return save_checkpoint(
        model, tok, path, meta={"model": "tiny", "seed": seed, "made_by": "omniedge.models.tiny"}
    )
