"""The omni-mini evaluation suite over a dataset's test split, for any model behind a small Predictor.

Tasks and scores: held-out text perplexity (vs a unigram model fitted on the training split, same
tokenizer, same predicted tokens); image question accuracy (exact match after normalisation, vs the
majority answer per question); speech WER on held-out voices (vs an empty transcript); mixed (spoken
question about an image) accuracy. Expert load per modality is collected on the teacher-forced passes.

Hook for exported bundles: anything with `teacher_forced` and `generate` (see Predictor) can be scored;
TorchPredictor wraps a transformers checkpoint, a runtime predictor can wrap an engine bundle.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from omniedge.eval.experts import ExpertLoad, capture_router_logits, token_modalities
from omniedge.eval.metrics import Estimate, accuracy, normalize_text, perplexity, word_error_rate
from omniedge.training.batches import ChatTokens, Example, collate, dataset_examples, read_records

TASK_METRIC = {"text": "perplexity", "image": "accuracy", "speech": "wer", "mixed": "accuracy"}
LOWER_IS_BETTER = {"perplexity": True, "wer": True, "accuracy": False}


class Predictor(Protocol):
    """What the suite needs from a model (transformers checkpoint today, engine bundle later)."""

    tokenizer: Any
    image_size: int

    def teacher_forced(
        self, examples: Sequence[Example], loads: ExpertLoad | None
    ) -> list[tuple[float, int]]:
        """(sum of NLL over labelled tokens, number of labelled tokens) per example."""
        ...

    def generate(self, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        """Greedy answers (decoded text, up to <|im_end|>) to each example's prompt."""
        ...


class TorchPredictor:
    """A Qwen3-Omni checkpoint run by transformers on CPU or GPU."""

    def __init__(
        self, model: Any, tokenizer: Any, device: str = "cpu", image_size: int = 64, batch_size: int = 32
    ):
        import torch

        from omniedge.models.family import thinker_of

        self.model, self.tokenizer, self.image_size, self.batch_size = (
            model,
            tokenizer,
            image_size,
            batch_size,
        )
        self.device = torch.device(device)
        self.thinker = thinker_of(model).to(self.device).eval()
        self.ct = ChatTokens.from_tokenizer(tokenizer)
        text_cfg = self.thinker.config.text_config
        self.num_layers, self.num_experts, self.top_k = (
            text_cfg.num_hidden_layers,
            text_cfg.num_experts,
            text_cfg.num_experts_per_tok,
        )
        if self.device.type == "cpu":
            # The default grouped_mm needs 16-byte-aligned weights on CPU; eager is exact everywhere.
            model.set_experts_implementation("eager")

    def new_load(self) -> ExpertLoad:
        return ExpertLoad(self.num_layers, self.num_experts, self.top_k)

    def teacher_forced(
        self, examples: Sequence[Example], loads: ExpertLoad | None
    ) -> list[tuple[float, int]]:
        import torch
        import torch.nn.functional as F

        out: list[tuple[float, int]] = []
        with torch.no_grad():
            for s in range(0, len(examples), self.batch_size):
                chunk = examples[s : s + self.batch_size]
                b = collate(self.ct, chunk, device=self.device)
                labels = b.pop("labels")
                with capture_router_logits(self.thinker) as routed:
                    res = self.thinker(**b, use_cache=False)
                logits = res.logits[:, :-1].float()
                tgt = labels[:, 1:]
                nll = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
                valid = tgt != -100
                sums, counts = (nll * valid).sum(1).tolist(), valid.sum(1).tolist()
                out += [(float(a), int(c)) for a, c in zip(sums, counts, strict=True)]
                if loads is not None and routed:
                    mod = token_modalities(
                        b["input_ids"], b["attention_mask"], self.ct.image_pad, self.ct.audio_pad
                    )
                    loads.add(routed, mod)
        return out

    def generate(self, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
        import torch

        texts: list[str] = []
        with torch.no_grad():
            for s in range(0, len(examples), self.batch_size):
                chunk = examples[s : s + self.batch_size]
                b = collate(self.ct, chunk, generation=True, device=self.device)
                width = b["input_ids"].shape[1]
                seqs = self.thinker.generate(
                    **b,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=self.ct.im_end,
                    pad_token_id=self.ct.pad,
                )
                for row in seqs[:, width:].tolist():
                    if self.ct.im_end in row:
                        row = row[: row.index(self.ct.im_end)]
                    texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts


@dataclass
class SuiteData:
    """Test examples per task plus what the trivial baselines need from the training split."""

    examples: dict[str, list[Example]]
    unigram_counts: np.ndarray  # token counts over the training text, same tokenizer
    majority: dict[str, dict[str, str]]  # task -> question kind -> most frequent training answer
    root: str


def _majorities(root: Path, task: str) -> dict[str, str]:
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for r in read_records(root, task, "train"):
        by_kind[str(r.get("task", task))][r["answer"]] += 1
    overall: Counter[str] = sum(by_kind.values(), Counter())
    out = {k: c.most_common(1)[0][0] for k, c in by_kind.items()}
    if overall:
        out[""] = overall.most_common(1)[0][0]
    return out


def load_suite_data(
    root: str | Path, tokenizer: Any, image_size: int, limit: int | None = None, progress: bool = True
) -> SuiteData:
    """Read the test split (features computed the runtime's way) and the training-split statistics."""
    root = Path(root)
    examples = {
        t: dataset_examples(tokenizer, root, t, "test", image_size=image_size, limit=limit, progress=progress)
        for t in TASK_METRIC
        if (root / t / "test.jsonl").is_file()
    }
    counts = np.zeros(tokenizer.get_vocab_size(), np.int64)
    if (root / "text" / "train.jsonl").is_file():
        for enc in tokenizer.encode_batch([r["text"] for r in read_records(root, "text", "train")]):
            counts += np.bincount(np.asarray(enc.ids, np.int64), minlength=len(counts))[: len(counts)]
    majority = {t: _majorities(root, t) for t in ("image", "mixed") if (root / t / "train.jsonl").is_file()}
    return SuiteData(examples, counts, majority, str(root))


def suite_data_from_pack(pack: str | Path, split: str = "val", limit: int | None = None) -> SuiteData:
    """SuiteData from a training pack (GPU machine: no audio decoding there); baselines from its train split."""
    from omniedge.training.pack import load_pack_examples, read_pack_meta

    read_pack_meta(pack)
    examples = {t: load_pack_examples(pack, t, split)[:limit] for t in TASK_METRIC}
    text_train = load_pack_examples(pack, "text", "train")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(Path(pack) / "tokenizer.json")).get_vocab_size()
    counts = np.zeros(vocab, np.int64)
    for ex in text_train:
        counts += np.bincount(np.asarray(ex.answer, np.int64), minlength=vocab)[:vocab]
    majority: dict[str, dict[str, str]] = {}
    for t in ("image", "mixed"):
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for ex in load_pack_examples(pack, t, "train"):
            by_kind[ex.kind][ex.reference] += 1
        majority[t] = {k: c.most_common(1)[0][0] for k, c in by_kind.items()}
    if not majority["mixed"]:  # spoken questions are synthesised in training: the scene questions' answers
        majority["mixed"] = majority["image"]
    return SuiteData({t: v for t, v in examples.items() if v}, counts, majority, str(pack))


def _unigram_nll(counts: np.ndarray, examples: Sequence[Example]) -> list[tuple[float, int]]:
    """Add-one smoothed unigram NLL of the same tokens the model predicts (all but each chunk's first)."""
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return [(float(-logp[np.asarray(ex.answer[1:])].sum()), len(ex.answer) - 1) for ex in examples]


def _by_group(
    values: Sequence[tuple[float, int]], examples: Sequence[Example]
) -> tuple[list[float], list[int]]:
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for (s, c), ex in zip(values, examples, strict=True):
        sums[ex.group][0] += s
        sums[ex.group][1] += c
    return [v[0] for v in sums.values()], [int(v[1]) for v in sums.values()]


def _entry(metric: str, est: Estimate, **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "lower_is_better": LOWER_IS_BETTER[metric], **est.as_dict(), **extra}


def run_suite(
    predictor: Predictor, data: SuiteData, *, collect_experts: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Score every task present in `data`; returns the JSON-ready result (tasks + expert load)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    loads = predictor.new_load() if collect_experts and hasattr(predictor, "new_load") else None
    tasks: dict[str, Any] = {}
    todo = [t for t in TASK_METRIC if data.examples.get(t)]
    for task in tqdm(todo, desc="eval", unit="task", disable=not progress):
        exs = data.examples[task]
        tf = predictor.teacher_forced(exs, loads)
        if task == "text":
            est = perplexity(*_by_group(tf, exs), unit="documents")
            uni = perplexity(*_by_group(_unigram_nll(data.unigram_counts, exs), exs), unit="documents")
            tasks[task] = _entry(
                "perplexity",
                est,
                baseline={"unigram": uni.as_dict()},
                vs_baseline=round(est.value / uni.value, 4),
            )
            continue
        answer_ppl = perplexity([s for s, _ in tf], [c for _, c in tf], unit="examples")
        max_new = max(len(ex.answer) for ex in exs) + 8
        hyps = predictor.generate(exs, max_new_tokens=max_new)
        refs = [ex.reference for ex in exs]
        samples = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:8]]
        if task == "speech":
            est = word_error_rate(refs, hyps)
            empty = word_error_rate(refs, [""] * len(refs))
            tasks[task] = _entry(
                "wer",
                est,
                baseline={"empty": empty.as_dict()},
                answer_perplexity=answer_ppl.value,
                samples=samples,
            )
        else:
            ok = [normalize_text(h) == normalize_text(r) for h, r in zip(hyps, refs, strict=True)]
            est = accuracy(ok)
            maj = data.majority.get(task, {})
            guess = [maj.get(ex.kind, maj.get("", "")) for ex in exs]
            base = accuracy(
                [normalize_text(g) == normalize_text(r) for g, r in zip(guess, refs, strict=True)]
            )
            by_kind: dict[str, list[bool]] = defaultdict(list)
            for ex, c in zip(exs, ok, strict=True):
                by_kind[ex.kind or task].append(c)
            tasks[task] = _entry(
                "accuracy", est, baseline={"majority": base.as_dict()},
                by_kind={k: accuracy(v).as_dict() for k, v in sorted(by_kind.items())},
                answer_perplexity=answer_ppl.value, samples=samples,
            )  # fmt: skip
    result: dict[str, Any] = {"tasks": tasks, "seconds": round(time.perf_counter() - t0, 1)}
    if loads is not None:
        result["experts"] = loads.report()
    return result
