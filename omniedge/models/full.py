"""The real Qwen3-Omni-30B-A3B-Instruct configuration, a CI-size reduction of it, and a tokenizer for both.

`full` is the exact published config (`qwen3_omni_30b_a3b_instruct.config.json` beside this file: the
non-default fields of the real checkpoint's config.json, 35,259,818,545 parameters built on the meta
device). `full-ci` keeps every structural feature (talker, code2wav, deepstack vision, fused MoE with
top-k routing, the real vocabulary and special-token ids, a vision FFN width that is not a multiple of 128)
at a size a 2-core CPU runs in seconds. Both get random weights from `omniedge.random_source`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

CONFIG_FILE = Path(__file__).resolve().parent / "qwen3_omni_30b_a3b_instruct.config.json"
# Registry names of the seeded random sources (omniedge.models.registry.open_source).
RANDOM_MODELS = ("full", "full-ci")


def full_config_dict() -> dict[str, Any]:
    """config.json of the real checkpoint (transformers 5.x field names), as a dict."""
    return json.loads(CONFIG_FILE.read_text())


def ci_config_dict() -> dict[str, Any]:
    """The real config with every width, depth and expert count scaled down; ids and structure kept."""
    cfg = full_config_dict()
    th = cfg["thinker_config"]
    th["text_config"].update(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
    )
    th["text_config"]["rope_parameters"]["mrope_section"] = [12, 10, 10]  # sums to head_dim / 2
    th["audio_config"].update(
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        d_model=64,
        output_dim=256,
        downsample_hidden_size=32,
    )
    th["vision_config"].update(
        depth=3,
        hidden_size=64,
        intermediate_size=172,  # like the real 4304: not a multiple of 128
        num_heads=2,
        out_hidden_size=256,
        deepstack_visual_indexes=[0, 1, 2],
    )
    tk = cfg["talker_config"]
    tk["thinker_hidden_size"] = 256
    tk["accept_hidden_layer"] = 1
    tk["text_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=64,
    )
    tk["text_config"]["rope_parameters"]["mrope_section"] = [6, 5, 5]
    tk["code_predictor_config"].update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
    )
    cfg["code2wav_config"].update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        decoder_dim=32,
    )
    return cfg


def random_config_dict(name: str) -> dict[str, Any]:
    """The config of a registry name in RANDOM_MODELS."""
    return full_config_dict() if name == "full" else ci_config_dict()


def with_layers(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """A copy of `config` whose thinker keeps only its first `layers` decoder layers."""
    out = copy.deepcopy(config)
    out["thinker_config"]["text_config"]["num_hidden_layers"] = int(layers)
    return out


def qwen_id_tokenizer(config: dict[str, Any]) -> Any:
    """omni-mini's byte-level BPE (trained on the project's text) with every special token moved to the id
    the config gives it (<|im_start|> 151644, <|image_pad|> 151655, ...), so a random model of the real
    config reads the same placeholder ids as the real tokenizer would give it."""
    from tokenizers import Tokenizer

    from omniedge.models.family import SPECIAL_TOKENS
    from omniedge.models.omni_mini import OMNI_MINI_DIR

    th = config["thinker_config"]
    ids = {
        "im_start": config["im_start_token_id"],
        "im_end": config["im_end_token_id"],
        "endoftext": config["im_start_token_id"] - 1,  # 151643 in Qwen's vocabulary
        "vision_start": th["vision_start_token_id"],
        "vision_end": th["vision_end_token_id"],
        "image_pad": th["image_token_id"],
        "video_pad": th["video_token_id"],
        "audio_start": th["audio_start_token_id"],
        "audio_end": th["audio_end_token_id"],
        "audio_pad": th["audio_token_id"],
    }
    d = json.loads((OMNI_MINI_DIR / "tokenizer.json").read_text())
    by_text = {SPECIAL_TOKENS[k]: v for k, v in ids.items()}
    for t in d["added_tokens"]:
        if t["content"] in by_text:
            # An id in the model vocabulary is kept as is; an added token's id alone would be renumbered.
            t["id"] = d["model"]["vocab"][t["content"]] = by_text[t["content"]]
    return Tokenizer.from_str(json.dumps(d))
