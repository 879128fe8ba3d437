"""The distillation loss: w_ce x CE(labels) + w_kl x T^2 x KL(teacher_T || student_T), per predicted token.

Positions: the next-token positions whose target carries a label (the answer and <|im_end|> of a chat
example, every token of a text chunk), the same positions for both terms. `p_T = softmax(z / T)`; the
T^2 factor keeps the KL gradient's scale independent of T (Hinton et al.). The reference article's
defaults: T = 2, 0.7 CE + 0.3 KL; `logit-only` distillation is ce = 0, kl = 1.

The teacher comes dense (every logit: on the fly, or k = vocabulary) or as its top-k logits (the cache).
With top-k, the teacher's distribution is its top-k renormalised at T (zero elsewhere) and the student
keeps its full softmax, so KL = sum_{i in top-k} p_i (log p_i - log q_i) >= 0: mass the student puts
outside the teacher's top-k is penalised, and k = vocabulary gives the exact KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omniedge.errors import OmniedgeError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossWeights:
    """Temperature and term weights; the article's defaults."""

    temperature: float = 2.0
    ce: float = 0.7
    kl: float = 0.3

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise OmniedgeError(f"temperature {self.temperature} is not > 0", "use e.g. --temperature 2")
        if self.ce < 0 or self.kl < 0 or self.ce + self.kl <= 0:
            raise OmniedgeError(
                f"loss weights ce={self.ce}, kl={self.kl}: both must be >= 0 and not both 0",
                "use e.g. --ce-weight 0.7 --kl-weight 0.3 (or --logit-only)",
            )

    @classmethod
    def logit_only(cls, temperature: float = 2.0) -> LossWeights:
        return cls(temperature=temperature, ce=0.0, kl=1.0)


@dataclass
class TeacherTargets:
    """The teacher at the predicted positions, rows in batch order (example by example, left to right).

    `values` [N, V] (dense logits) with `indices` None, or [N, k] top-k logits with `indices` [N, k].
    """

    values: Any
    indices: Any = None

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])


def predicted_mask(labels: Any) -> Any:
    """bool [B, L]: position t predicts labels[:, t+1], and that label is not IGNORE_INDEX."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def rows_at(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(logits [N, V], target ids [N]) at the predicted positions, in batch order."""
    mask = predicted_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    return logits[mask], targets


def predicted_count(labels: Any) -> int:
    """How many predicted positions a label row (or batch) has."""
    return int(predicted_mask(labels).sum())


def topk_targets(logits_rows: Any, k: int | None) -> TeacherTargets:
    """Dense rows -> the top-k form (k None or >= vocabulary: dense)."""
    import torch

    if k is None or k >= logits_rows.shape[-1]:
        return TeacherTargets(logits_rows)
    values, indices = torch.topk(logits_rows, k, dim=-1)
    return TeacherTargets(values, indices)


def kl_per_token(student_rows: Any, teacher: TeacherTargets, temperature: float) -> Any:
    """KL(teacher_T || student_T) per row [N], in float32."""
    import torch.nn.functional as F

    log_q = F.log_softmax(student_rows.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.values.float() / temperature, dim=-1)
    if teacher.indices is not None:
        log_q = log_q.gather(-1, teacher.indices.long())
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def ce_per_token(student_rows: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(student_rows.float(), targets, reduction="none")


def distill_loss(
    student_rows: Any, targets: Any, teacher: TeacherTargets | None, weights: LossWeights, normalizer: float
) -> tuple[Any, dict[str, Any]]:
    """(loss to back-propagate, detached sums {"ce", "kl", "tokens"}).

    loss = (w_ce x sum CE + w_kl x T^2 x sum KL) / normalizer: pass the number of predicted tokens of
    the whole optimizer step (all micro-batches, all processes), scaled as the caller's gradient
    averaging needs, so that every token weighs the same however the batch is split.
    """
    if teacher is not None and teacher.rows != int(student_rows.shape[0]):
        raise OmniedgeError(
            f"the teacher gives {teacher.rows} predicted positions for a batch with {student_rows.shape[0]}",
            "the teacher-logit cache does not belong to this data: make it again for this data",
        )
    ce = ce_per_token(student_rows, targets)
    total = weights.ce * ce.sum()
    sums: dict[str, Any] = {"ce": ce.detach().sum(), "tokens": int(targets.numel())}
    if teacher is not None:
        kl = kl_per_token(student_rows, teacher, weights.temperature)
        total = total + weights.kl * weights.temperature**2 * kl.sum()
        sums["kl"] = kl.detach().sum()
    elif weights.kl > 0:
        raise OmniedgeError("a KL weight > 0 needs the teacher's logits", "pass a teacher")
    return total / normalizer, sums
