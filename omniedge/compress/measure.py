"""Quality after each stage against the teacher, on held-out text never used for calibration.

The teacher's next-token log-probabilities are computed once before any stage changes the model;
each stage is then scored by mean KL(teacher || student), top-1 agreement and student perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omniedge.errors import OmniedgeError
from omniedge.models.family import thinker_parts


@dataclass
class Reference:
    ids: list[torch.Tensor]  # [1, seq] int64 per text
    logprobs: list[torch.Tensor]  # [seq, vocab] float16 teacher log-softmax, on CPU
    teacher_ppl: float


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[torch.Tensor]:
    out = [torch.tensor([tokenizer.encode(t, add_special_tokens=False).ids[:max_tokens]]) for t in texts]
    out = [x for x in out if x.shape[1] >= 2]
    if not out:
        raise OmniedgeError("no held-out text has 2 or more tokens", "give measure.texts > 0")
    return out


def _logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    thinker = thinker_parts(model).thinker
    device = next(thinker.parameters()).device
    with torch.inference_mode():
        ids = ids.to(device)
        logits = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    # float16 on the CPU: the teacher's distributions for a real vocabulary (152k) must fit in host memory;
    # teacher and student are rounded alike, so identical models still compare as exactly equal.
    return torch.log_softmax(logits[0].float(), dim=-1).to(torch.float16).cpu()


def _nll(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token (positions 0..n-2 predict 1..n-1)."""
    return -logprobs[:-1].float().gather(-1, ids[0, 1:, None].cpu())[:, 0]


def reference(
    model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int, progress: bool = True
) -> Reference:
    """Run the teacher once over the held-out texts."""
    from tqdm.auto import tqdm

    ids = encode_texts(tokenizer, texts, max_tokens)
    lps = [_logprobs(model, x) for x in tqdm(ids, desc="teacher", unit="text", disable=not progress)]
    nll = torch.cat([_nll(lp, x) for lp, x in zip(lps, ids, strict=True)])
    return Reference(ids, lps, float(math.exp(nll.mean())))


def compare(model: Any, ref: Reference, progress: bool = True) -> dict[str, Any]:
    """{"kl": mean KL(teacher || student) in nats per position, "top1": argmax agreement, "ppl", "tokens"}."""
    from tqdm.auto import tqdm

    kls, agree, nlls = [], [], []
    for x, t in tqdm(
        list(zip(ref.ids, ref.logprobs, strict=True)), desc="measuring", unit="text", disable=not progress
    ):
        s = _logprobs(model, x).float()
        t = t.float()
        kls.append((t.exp() * (t - s)).sum(-1))
        agree.append((t.argmax(-1) == s.argmax(-1)).float())
        nlls.append(_nll(s, x))
    nll = torch.cat(nlls)
    return {
        "kl": float(torch.cat(kls).mean()),
        "top1": float(torch.cat(agree).mean()),
        "ppl": float(math.exp(nll.mean())),
        "teacher_ppl": ref.teacher_ppl,
        "tokens": int(sum(x.shape[1] for x in ref.ids)),
    }
