"""Byte-level BPE tokenizers with Qwen3-Omni's special tokens, trained on our own text (no hub)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omniedge.models.family import ROLE_TOKENS, SPECIAL_TOKENS


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE; special tokens come last so ordinary ids stay dense from 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_special = len(SPECIAL_TOKENS) + len(ROLE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Role words are single ordinary tokens in Qwen's vocabulary; keep them so here too.
    tok.add_tokens(list(ROLE_TOKENS))
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of every special and role token, by short name (im_start, image_pad, user, ...)."""
    ids: dict[str, int] = {}
    for name, text in [*SPECIAL_TOKENS.items(), *((r, r) for r in ROLE_TOKENS)]:
        i = tok.token_to_id(text)
        if i is None:
            raise ValueError(f"tokenizer has no {text!r} token")
        ids[name] = i
    return ids


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """tokenizer.json for the runtime, tokenizer_config.json so transformers can load it too."""
    directory = Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": SPECIAL_TOKENS["im_end"],
        "pad_token": SPECIAL_TOKENS["endoftext"],
        "model_max_length": 32768,
        "additional_special_tokens": list(SPECIAL_TOKENS.values()),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
