"""Quality after each stage against the teacher, per modality, on held-out requests never calibrated on.

The held-out requests (text, image + text, audio + text) are carried through the stack as the teacher's
hidden states and one student stream per stage (omniedge.compress.layerwise); at the end each stream goes
through the final norm and lm_head. Scored positions are those whose next token is text (the prompt after
the media, the reply): mean KL(teacher || student) in nats, top-1 agreement, student perplexity.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from omniedge.compress.calibration import TEXT
from omniedge.compress.layerwise import Sample


def _scored(sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, the token each predicts): every position whose next token is text."""
    nxt = sample.modality[1:].cpu() == TEXT
    pos = torch.nonzero(nxt)[:, 0]
    return pos, sample.ids[1:].cpu()[pos]


def _summary(kl: list[torch.Tensor], agree: list[torch.Tensor], nll: list[torch.Tensor]) -> dict[str, Any]:
    n = torch.cat(nll)
    return {
        "kl": float(torch.cat(kl).mean()),
        "top1": float(torch.cat(agree).mean()),
        "ppl": float(math.exp(n.mean())),
        "tokens": int(n.numel()),
    }


def score_streams(
    logits: Any,
    samples: list[Sample],
    streams: dict[str, list[torch.Tensor]],
    head_of: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """{stream: {"kl", "top1", "ppl", "tokens", "by_modality": {kind: {...}}}} against the "teacher"
    stream; `logits(hidden [1, S, H])` -> [S, vocab] float32 is the final norm + lm_head; `head_of` gives a
    stream its own (an INT4 lm_head for the stages from the quantize stage on)."""
    head_of = head_of or {}
    students = [k for k in streams if k != "teacher"]
    acc: dict[str, dict[str, tuple[list[torch.Tensor], ...]]] = {k: {} for k in ("teacher", *students)}
    for i, s in enumerate(samples):
        pos, target = _scored(s)
        if pos.numel() == 0:
            continue
        # On the device (a [positions, vocab] float32 per stream); only per-position numbers come back.
        t = torch.log_softmax(logits(streams["teacher"][i])[pos.to(s.ids.device)], dim=-1)
        p_t = t.exp()
        target = target.to(t.device)
        for k in ("teacher", *students):
            f = head_of.get(k, logits)
            st = t if k == "teacher" else torch.log_softmax(f(streams[k][i])[pos.to(t.device)], dim=-1)
            kl = (p_t * (t - st)).sum(-1) if k != "teacher" else torch.zeros(len(pos), device=t.device)
            agree = (t.argmax(-1) == st.argmax(-1)).float()
            nll = -st.gather(-1, target[:, None])[:, 0]
            for kind in (s.kind, "all"):
                bucket = acc[k].setdefault(kind, ([], [], []))
                for j, v in enumerate((kl, agree, nll)):
                    bucket[j].append(v.cpu())
            del st
    out: dict[str, dict[str, Any]] = {}
    for k, kinds in acc.items():
        if "all" not in kinds:
            continue
        out[k] = {
            **_summary(*kinds["all"]),
            "by_modality": {m: _summary(*v) for m, v in kinds.items() if m != "all"},
        }
    return out
