"""Greedy parity of a bundle against transformers, made where transformers runs and checked where the bundle runs.

`make` (needs torch + transformers): for each request (text, optional image, optional audio), the prompt is
built by the runtime's own preprocessing, transformers' thinker generates greedily from the checkpoint the
bundle was exported from, and the reference keeps, per step, the token and the gap between the two best
logits. `check` (runtime only, any provider): the bundle answers the same requests; tokens must be equal,
or else, at the first divergence (both sides with the same history), the reference's gap between its token and
ours must be within twice how far our logits moved from the reference's at that step: a rounding near-tie,
not a wrong graph. Prefill logits are compared too (max |diff| / max |ref|).

    python -m omniedge.bench.parity make CHECKPOINT CPU_BUNDLE requests.npz -o ref.npz
    python -m omniedge.bench.parity check GPU_BUNDLE ref.npz --providers cuda --json parity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

NEAR_TIE = 0.05  # logits: a top-2 gap below this is a near-tie whatever the precision (tests use it)
TOP = 8  # reference logits kept per step: enough to see how far ours moved at a divergence


def hf_greedy(
    model: Any, req: Any, eos: tuple[int, ...], n: int
) -> tuple[list[int], list[float], np.ndarray]:
    """transformers' greedy generation for a preprocessed runtime request: (tokens, top-2 gap per step,
    first-step logits)."""
    import torch

    kwargs: dict[str, Any] = {}
    if req.pixel_values is not None:
        kwargs["pixel_values"] = torch.from_numpy(req.pixel_values)
        kwargs["image_grid_thw"] = torch.tensor([list(req.image_grid_thw)])
    if req.mel is not None:
        kwargs["input_features"] = torch.from_numpy(req.mel)[None]
        kwargs["feature_attention_mask"] = torch.ones(1, req.mel.shape[1], dtype=torch.long)
    ids = torch.from_numpy(req.prompt.ids)[None]
    with torch.no_grad():
        out = model.thinker.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    gaps = []
    for s in out.scores:
        top2 = torch.topk(s[0].float(), 2).values
        gaps.append(float(top2[0] - top2[1]))
    return tokens, gaps, torch.stack([s[0].float() for s in out.scores]).numpy()


def _requests(path: Path) -> list[dict[str, Any]]:
    d = np.load(path, allow_pickle=False)
    out = []
    for i in range(int(d["count"])):
        out.append(
            {
                "prompt": str(d[f"prompt_{i}"]),
                "image": d[f"image_{i}"] if f"image_{i}" in d.files else None,
                "audio": (d[f"audio_{i}"], 16000) if f"audio_{i}" in d.files else None,
                "kind": str(d[f"kind_{i}"]),
            }
        )
    return out


def save_requests(path: Path, requests: list[dict[str, Any]]) -> None:
    """requests: {"prompt", "kind", optional "image" uint8 HxWx3, optional "audio" float32 16 kHz}."""
    arrays: dict[str, Any] = {"count": np.array(len(requests))}
    for i, r in enumerate(requests):
        arrays[f"prompt_{i}"] = np.array(r["prompt"])
        arrays[f"kind_{i}"] = np.array(r.get("kind", "text"))
        if r.get("image") is not None:
            arrays[f"image_{i}"] = np.asarray(r["image"], np.uint8)
        if r.get("audio") is not None:
            arrays[f"audio_{i}"] = np.asarray(r["audio"], np.float32)
    np.savez_compressed(path, **arrays)


def make(checkpoint: Path, cpu_bundle: Path, requests_npz: Path, out: Path, new_tokens: int = 32) -> None:
    from omniedge.checkpoint import load_checkpoint
    from omniedge.runtime.app import Omni

    model, _ = load_checkpoint(checkpoint)
    omni = Omni.load(cpu_bundle)
    reqs = _requests(requests_npz)
    arrays: dict[str, Any] = {"new_tokens": np.array(new_tokens)}
    for i, r in enumerate(reqs):
        pre = omni.preprocess(r["prompt"], image=r["image"], audio=r["audio"])
        toks, gaps, steps = hf_greedy(model, pre, omni.manifest.eos_token_ids, new_tokens)
        top = np.argsort(-steps, axis=-1)[:, :TOP]
        arrays[f"tokens_{i}"] = np.asarray(toks, np.int64)
        arrays[f"gaps_{i}"] = np.asarray(gaps, np.float32)
        arrays[f"logits_{i}"] = steps[0].astype(np.float32)
        arrays[f"top_idx_{i}"] = top.astype(np.int64)
        arrays[f"top_val_{i}"] = np.take_along_axis(steps, top, -1).astype(np.float32)
    src = dict(np.load(requests_npz, allow_pickle=False))
    np.savez_compressed(out, **src, **arrays)


def _greedy_logits(omni: Any, r: dict[str, Any], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Our greedy tokens and each step's logits, through the runtime's own thinker runner."""
    inputs = omni.thinker_inputs(omni.preprocess(r["prompt"], image=r["image"], audio=r["audio"]))
    seq, eos = int(inputs.ids.size), set(omni.manifest.eos_token_ids)
    out = omni.thinker.prefill(inputs.inputs_embeds, inputs.position_ids[:, 0, :], inputs.deepstack_embeds)
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    for step in range(n):
        logits.append(out.logits())
        tokens.append(int(np.argmax(logits[-1])))
        if tokens[-1] in eos or step == n - 1:
            break
        out = omni.thinker.decode(omni.embed_table[tokens[-1]], seq + step + inputs.rope_delta)
    return tokens, logits


def _explain(d: Any, i: int, j: int, ours: np.ndarray, got: int) -> dict[str, Any]:
    """At the first divergence j (same history on both sides): is it a near-tie? The reference's gap between
    its token and ours, against how far our logits moved from the reference's at that step (its top-8)."""
    idx, val = d[f"top_idx_{i}"][j], d[f"top_val_{i}"][j]
    moved = float(np.abs(ours[idx] - val).max())
    if got not in idx.tolist():
        return {"reference_gap": None, "logit_error_there": moved, "near_tie": False}
    gap = float(val[0] - val[idx.tolist().index(got)])
    return {"reference_gap": gap, "logit_error_there": moved, "near_tie": gap < NEAR_TIE or gap <= 2 * moved}


def check(bundle: Path, ref: Path, providers: str | None) -> dict[str, Any]:
    """A divergence counts as explained when the reference's two candidates are within twice the logit error
    measured at that very step (or within NEAR_TIE): a rounding near-tie, not a wrong graph."""
    from omniedge.runtime.app import Omni

    d = np.load(ref, allow_pickle=False)
    n = int(d["new_tokens"])
    omni = Omni.load(bundle, providers=providers)
    rows = []
    for i, r in enumerate(_requests(ref)):
        want = d[f"tokens_{i}"].tolist()
        got, logits = _greedy_logits(omni, r, n)
        ref_first = d[f"logits_{i}"]
        err = float(np.abs(logits[0] - ref_first).max() / np.abs(ref_first).max())
        diverge = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if diverge is None and len(got) != len(want):
            diverge = min(len(got), len(want))
        row: dict[str, Any] = {
            "kind": r["kind"],
            "equal": diverge is None,
            "first_divergence": diverge,
            "prefill_logits_rel_err": err,
            "near_tie": False,
        }
        if diverge is not None and diverge < len(logits) and diverge < len(d[f"top_idx_{i}"]):
            row.update(_explain(d, i, diverge, logits[diverge], got[diverge]))
        rows.append(row)
    omni.close()
    return {
        "bundle": str(bundle),
        "providers": providers,
        "new_tokens": n,
        "requests": len(rows),
        "equal": sum(r["equal"] for r in rows),
        "near_tie_divergences": sum(r["near_tie"] for r in rows),
        "max_prefill_logits_rel_err": max(r["prefill_logits_rel_err"] for r in rows),
        "all_explained": all(r["equal"] or r["near_tie"] for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("checkpoint", type=Path)
    mk.add_argument("cpu_bundle", type=Path)
    mk.add_argument("requests", type=Path)
    mk.add_argument("-o", "--out", type=Path, required=True)
    mk.add_argument("--new-tokens", type=int, default=32)
    ck = sub.add_parser("check")
    ck.add_argument("bundle", type=Path)
    ck.add_argument("ref", type=Path)
    ck.add_argument("--providers")
    ck.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "make":
        make(a.checkpoint, a.cpu_bundle, a.requests, a.out, a.new_tokens)
    else:
        r = check(a.bundle, a.ref, a.providers)
        text = json.dumps(r, indent=1)
        if a.json:
            a.json.write_text(text)
        print(json.dumps({k: v for k, v in r.items() if k != "rows"}))


if __name__ == "__main__":
    main()
