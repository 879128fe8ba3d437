"""How much a distillation step costs next to a training step of the teacher, on the same batches.

    python -m omniedge.distill.step_time TEACHER STUDENT --data PACK --batch '{"text": 4, ...}' --steps 6

Times (median over steps, after one warm-up) of (a) the teacher's own training step (forward + backward,
cross-entropy: what `omniedge.training.train` runs) and (b) a distillation step (teacher forward without
gradients + student forward + backward with the distillation loss), on the same device and batches. The
ratio b / a turns a measured training step time on another machine into an estimate of the distillation
step there (docs/distill.md uses it with omni-mini's H200 training log).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def measure(
    teacher: str, student: str, data: str, batch: dict[str, int], steps: int, device: str = "cpu"
) -> dict[str, Any]:
    import torch

    from omniedge.distill import pair
    from omniedge.distill.data import BatchPlan, load_data
    from omniedge.distill.loss import LossWeights, TeacherTargets, distill_loss, rows_at
    from omniedge.models.family import thinker_of
    from omniedge.training.batches import ChatTokens, collate

    t, s = pair.load(teacher), pair.load(student)
    tt, st = thinker_of(t.model).to(device).train(), thinker_of(s.model).to(device).train()
    for m in (tt, st):
        m.set_experts_implementation("grouped_mm" if device == "cuda" else "eager")
    d = load_data(
        data, "train", s.tokenizer, s.image_size, limit=256, tasks=[k for k, n in batch.items() if n]
    )
    plan = BatchPlan(d, batch, 0, 1, 1)
    ct = ChatTokens.from_tokenizer(s.tokenizer)
    w = LossWeights()
    times: dict[str, list[float]] = {"train": [], "distill": []}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for step in range(steps + 1):
        b = collate(ct, [d.examples[i] for i in plan.global_indices(step)], positions=True, device=device)
        labels = b.pop("labels")
        sync()
        t0 = time.perf_counter()
        rows, targets = rows_at(tt(**b, use_cache=False).logits, labels)
        torch.nn.functional.cross_entropy(rows.float(), targets).backward()
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            trow, _ = rows_at(tt(**b, use_cache=False).logits, labels)
        srow, targets = rows_at(st(**b, use_cache=False).logits, labels)
        distill_loss(srow, targets, TeacherTargets(trow), w, float(len(targets)))[0].backward()
        sync()
        t2 = time.perf_counter()
        tt.zero_grad(set_to_none=True)
        st.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times["train"].append(t1 - t0)
            times["distill"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": device,
        "batch": batch,
        "steps": steps,
        "train_step_s": med["train"],
        "distill_step_s": med["distill"],
        "ratio": med["distill"] / med["train"],
        "all_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omniedge.distill.step_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("teacher")
    p.add_argument("student")
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=json.loads, default={"text": 4, "image": 16, "speech": 12, "mixed": 4})
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(
        json.dumps(
            measure(args.teacher, args.student, args.data, args.batch, args.steps, args.device), indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
