"""omni-mini: the project's own small, trained Qwen3-Omni teacher (config, tokenizer, where its weights live).

Small enough for CPU tests and the repository (bf16 weights < 24 MB), yet a real MoE with 32 experts and
top-4 routing in every thinker layer, so expert pruning has choices to make. Every weight the INT4 stage
quantizes in the thinker has an input width of 128 or 256 (group 128 applies whole).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omniedge.models.tiny import thinker_only_config

OMNI_MINI_DIR = Path(__file__).resolve().parent / "omni_mini"
NAME = "omni-mini"
VOCAB_SIZE = 3584
IMAGE_SIZE = 64  # square side the image is resized to: (64/16)^2 = 16 patches -> 4 image tokens
TASKS = ("text", "image", "speech", "mixed")


def omni_mini_config_dict(
    vocab_size: int, special: dict[str, int], audio_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Kwargs for Qwen3OmniMoeConfig (thinker only); `special` maps token names to ids.

    `audio_overrides` replaces audio-encoder settings (a smaller encoder for CPU tests of training).
    """
    text = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        moe_intermediate_size=128,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000,
            "mrope_section": [12, 10, 10],
            "interleaved": True,
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
    )
    audio = dict(
        num_mel_bins=128,
        encoder_layers=3,
        encoder_attention_heads=4,
        encoder_ffn_dim=384,
        d_model=256,
        output_dim=256,
        n_window=50,
        n_window_infer=800,
        conv_chunksize=500,
        downsample_hidden_size=48,
        max_source_positions=1500,
    )
    audio.update(audio_overrides or {})
    vision = dict(
        depth=2,
        hidden_size=128,
        intermediate_size=512,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=256,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    return thinker_only_config(text, audio, vision, special)


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """Byte-level BPE on the training corpus with Qwen3-Omni's special tokens (ids dense from 0)."""
    from omniedge.models.tokenizer import train_bpe

    return train_bpe(texts, vocab_size)


def corpus_texts(dataset_root: str | Path, split: str = "train") -> Iterator[str]:
    """Every string the model reads or writes in a split: text documents, transcripts, prompts, answers."""
    root = Path(dataset_root)
    for task, keys in (
        ("text", ("text",)),
        ("speech", ("text",)),
        ("image", ("prompt", "answer")),
        ("mixed", ("prompt", "answer")),
    ):
        f = root / task / f"{split}.jsonl"
        if not f.is_file():
            continue
        with f.open() as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    for k in keys:
                        if rec.get(k):
                            yield str(rec[k])
    from omniedge.training.batches import ASR_PROMPT

    yield ASR_PROMPT


def build_omni_mini(tokenizer: Any, seed: int = 0, audio_overrides: dict[str, Any] | None = None) -> Any:
    """A freshly initialised omni-mini (fp32, train mode) for a tokenizer; deterministic for a seed.

    The audio tower's convolutions get a variance-preserving (Kaiming) init: transformers' N(0, 0.02)
    shrinks the log-mel ~2000x through the three convolutions and conv_out, so the encoder's input would
    be drowned by its positional embedding (std 0.7) at the start of training.
    """
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omniedge.models.family import thinker_parts
    from omniedge.models.tokenizer import special_ids

    ids = special_ids(tokenizer)
    cfg = Qwen3OmniMoeConfig(**omni_mini_config_dict(tokenizer.get_vocab_size(), ids, audio_overrides))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(cfg)
    audio = thinker_parts(model).audio_tower
    with torch.no_grad():
        for conv in (audio.conv2d1, audio.conv2d2, audio.conv2d3):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
        torch.nn.init.normal_(audio.conv_out.weight, std=audio.conv_out.in_features**-0.5)
    return model


def omni_mini_path() -> Path:
    """The committed checkpoint directory; a clear error if the weights are not there."""
    from omniedge.checkpoint import check_checkpoint_dir
    from omniedge.errors import OmniedgeError

    if not (OMNI_MINI_DIR / "config.json").is_file():
        raise OmniedgeError(
            f"omni-mini weights are not installed (no {OMNI_MINI_DIR / 'config.json'})",
            "reinstall omniedge from the repository, or train them: python -m omniedge.training.train --help",
        )
    return check_checkpoint_dir(OMNI_MINI_DIR)
