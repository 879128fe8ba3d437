"""Training losses: next-token cross entropy per task, the router's load-balancing loss, and a CTC loss
on the audio encoder's output.

CTC (connectionist temporal classification) makes the audio encoder's tokens spell what was said, over
the BPE vocabulary plus a blank: the encoder must then learn acoustics, which the answer loss alone did
not teach it (omni-mini memorised the training sentences instead). BPE rather than characters because the
encoder makes 13 tokens per second, and the training voices say 12-23 characters per second (120-230
words per minute), more than CTC can align for most utterances; their BPE targets come at 3-6 per second
(measured: docs/omni-mini.md). The head (a linear layer on the encoder's output) is used only in
training and is not part of the saved model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from omniedge.training.batches import audio_token_count

CTC_KEYS = ("ctc_targets", "ctc_target_lengths")


def make_ctc_head(model: Any) -> Any:
    """Linear(encoder output width, vocab + 1): the last class is CTC's blank."""
    import torch

    from omniedge.models.family import thinker_parts

    audio = thinker_parts(model).audio_tower
    width = audio.config.output_dim
    vocab = thinker_parts(model).lm_head.out_features
    head = torch.nn.Linear(width, vocab + 1)
    torch.nn.init.normal_(head.weight, std=width**-0.5)
    torch.nn.init.zeros_(head.bias)
    return head


def token_counts(feature_attention_mask: Any) -> list[int]:
    """Audio tokens the encoder makes for each audio of a batch (in batch order)."""
    return [audio_token_count(int(n)) for n in feature_attention_mask.sum(1).tolist()]


@contextlib.contextmanager
def capture_audio_output(model: Any) -> Iterator[list[Any]]:
    """Collect the audio encoder's output ([audio tokens of every audio, width]) of the forwards inside."""
    from omniedge.models.family import thinker_parts

    seen: list[Any] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        seen.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = thinker_parts(model).audio_tower.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def encode_audio(model: Any, batch: dict[str, Any]) -> Any:
    """The audio encoder alone on a batch's audio: [audio tokens of every audio, width]."""
    from omniedge.models.family import thinker_of

    out = thinker_of(model).get_audio_features(batch["input_features"], batch["feature_attention_mask"])
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _frames(head: Any, hidden: Any, counts: Sequence[int]) -> tuple[Any, Any]:
    import torch

    if hidden.shape[0] != sum(counts):
        raise ValueError(f"audio encoder gave {hidden.shape[0]} tokens, expected {sum(counts)}")
    padded = torch.nn.utils.rnn.pad_sequence(list(hidden.split(list(counts))), batch_first=True)
    logp = head(padded.float()).log_softmax(-1)  # [audios, frames, vocab + 1], fp32 outside autocast
    return logp, torch.tensor(list(counts), device=hidden.device)


def ctc_loss(head: Any, hidden: Any, counts: Sequence[int], targets: Any, target_lengths: Any) -> Any:
    """Mean over audios with a known transcript of CTC loss / transcript length (impossible alignments: 0)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(hidden.device.type, enabled=False):
        logp, lengths = _frames(head, hidden, counts)
        keep = target_lengths > 0
        if not bool(keep.any()):
            return hidden.sum() * 0.0
        return F.ctc_loss(
            logp[keep].transpose(0, 1),
            targets,
            lengths[keep],
            target_lengths[keep],
            blank=logp.shape[-1] - 1,
            reduction="mean",
            zero_infinity=True,
        )


def ctc_greedy(head: Any, hidden: Any, counts: Sequence[int]) -> list[list[int]]:
    """Best path per audio: argmax per token, repeats merged, blanks dropped."""
    import torch

    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        logp, _ = _frames(head, hidden, counts)
        best = logp.argmax(-1).tolist()
    blank = logp.shape[-1] - 1
    out = []
    for row, n in zip(best, counts, strict=True):
        ids, prev = [], blank
        for t in row[:n]:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


def task_losses(logits: Any, labels: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """Mean next-token cross entropy per task (over labelled tokens of that task's rows)."""
    import torch
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    valid = (shift_labels != -100).float()
    out = {}
    for task in dict.fromkeys(tasks):
        rows = torch.tensor([t == task for t in tasks], device=logits.device)
        num = (tok_loss * valid)[rows].sum()
        den = valid[rows].sum().clamp_min(1.0)
        out[task] = num / den
    return out


def forward_losses(
    model: Any,
    batch: dict[str, Any],
    aux_coef: float,
    weights: dict[str, float],
    ctc_head: Any = None,
    ctc_weight: float = 0.0,
    lm: bool = True,
) -> tuple[Any, dict[str, float]]:
    """(total loss tensor, logged float losses) for one collated batch.

    total = weighted mean of the per-task answer losses + aux_coef x router balance + ctc_weight x CTC.
    `lm=False` runs the audio encoder alone and returns ctc_weight x CTC (the encoder phase).
    """
    from omniedge.models.family import thinker_of

    use_ctc = ctc_head is not None and ctc_weight > 0 and "ctc_targets" in batch
    model_kwargs = {k: v for k, v in batch.items() if k not in ("labels", "task_of_row", *CTC_KEYS)}
    logged: dict[str, float] = {}
    total: Any = 0.0
    hidden = None
    if lm:
        tasks = batch["task_of_row"]
        with capture_audio_output(model) if use_ctc else contextlib.nullcontext([]) as seen:
            out = thinker_of(model)(**model_kwargs, output_router_logits=True, use_cache=False)
        per_task = task_losses(out.logits, batch["labels"], tasks)
        total = sum(weights.get(t, 1.0) * v for t, v in per_task.items()) / sum(
            weights.get(t, 1.0) for t in per_task
        )
        aux = out.aux_loss if out.aux_loss is not None else 0.0
        total = total + aux_coef * aux
        logged = {t: float(v.detach()) for t, v in per_task.items()}
        logged["aux"] = float(aux.detach()) if hasattr(aux, "detach") else float(aux)
        hidden = seen[-1] if seen else None
    elif use_ctc:
        hidden = encode_audio(model, batch)
    if use_ctc and hidden is not None:
        counts = token_counts(batch["feature_attention_mask"])
        ctc = ctc_loss(ctc_head, hidden, counts, batch["ctc_targets"], batch["ctc_target_lengths"])
        total = total + ctc_weight * ctc
        logged["ctc"] = float(ctc.detach())
    return total, logged
