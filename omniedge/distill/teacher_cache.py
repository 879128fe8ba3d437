"""Teacher logits computed once and stored as top-k, so teacher and student never share a device.

Layout of a cache directory:
- `manifest.json`: `{"format": "omniedge-teacher-topk", "version": 1, "teacher": {"path", "identity"},
  "data": {"fingerprint", "examples", "predicted_tokens", "description"}, "k", "vocab_size",
  "shard_examples", "shards": [{"file", "first", "count", "tokens", "mass_t1", "mass_t2"}], "complete"}`.
- `topk-0000j.safetensors` (shard j = examples [j x shard_examples, ...)): `values` float16 [tokens, k]
  (the teacher's top-k logits minus the row's largest; a softmax does not see the shift), `indices`
  int16 (int32 for vocabularies >= 32768) [tokens, k], sorted by value, and `offsets` int64 [count + 1]:
  example i of the shard owns rows offsets[i]:offsets[i+1], one per predicted position (loss.py), left
  to right. `mass_t1` / `mass_t2`: the mean share of the teacher's probability the top-k hold at T = 1, 2.

Shards are written one at a time (temp file, then rename), so an interrupted build resumes where it
stopped; with several processes, process r builds shards r, r + world, ... A cache made from other data,
by another teacher, or with a smaller k is refused with one clear error; a larger k is cut to the one asked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.atomic import atomic_write_json
from omniedge.distill.data import DistillData
from omniedge.distill.loss import TeacherTargets, rows_at
from omniedge.errors import OmniedgeError
from omniedge.outputs import TEACHER_CACHE, check_replaceable

FORMAT = "omniedge-teacher-topk"
VERSION = 1
MANIFEST = "manifest.json"


def shard_file(j: int) -> str:
    return f"topk-{j:05d}.safetensors"


def _refuse(cache: Path, problem: str) -> OmniedgeError:
    return OmniedgeError(
        f"the teacher-logit cache {cache} {problem}",
        f"pass a new --teacher-cache directory (it is built on first use), or delete {cache} to build it "
        "again for this teacher and data",
    )


def expected_manifest(
    teacher_path: Path,
    teacher_identity: dict[str, str],
    data: DistillData,
    k: int,
    vocab: int,
    shard_examples: int,
) -> dict[str, Any]:
    n = len(data.examples)
    return {
        "format": FORMAT,
        "version": VERSION,
        "teacher": {"path": str(teacher_path), "identity": teacher_identity},
        "data": {
            "fingerprint": data.fingerprint,
            "examples": n,
            "predicted_tokens": int(data.counts.sum()),
            "description": data.description,
        },
        "k": k,
        "vocab_size": vocab,
        "shard_examples": shard_examples,
        "shards": [],
        "complete": False,
    }


def read_manifest(cache: Path) -> dict[str, Any]:
    f = cache / MANIFEST
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise _refuse(cache, f"has no readable {MANIFEST} ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise _refuse(cache, f"is not an {FORMAT} cache of version {VERSION}")
    return m


def check_matches(
    cache: Path, have: dict[str, Any], teacher_identity: dict[str, str], data: DistillData, k: int
) -> None:
    """Refuse a cache from another teacher, other data, or with fewer than k logits per position."""
    if have["teacher"]["identity"] != teacher_identity:
        raise _refuse(cache, f"was made by another teacher ({have['teacher']['path']}, different weights)")
    hd = have["data"]
    if hd["fingerprint"] != data.fingerprint or hd["examples"] != len(data.examples):
        src = hd.get("description", {})
        raise _refuse(
            cache,
            f"was made from other data ({hd['examples']} examples of {src.get('source')} split "
            f"{src.get('split')}, fingerprint {hd['fingerprint'][:12]}; this run's data: "
            f"{len(data.examples)} examples, fingerprint {data.fingerprint[:12]})",
        )
    if int(have["k"]) < k:
        raise _refuse(cache, f"holds the top {have['k']} logits per position; this run asks for {k}")


def open_cache(
    cache: Path,
    teacher_path: Path,
    teacher_identity: dict[str, str],
    data: DistillData,
    k: int,
    vocab: int,
    shard_examples: int = 2048,
    is_main: bool = True,
) -> dict[str, Any]:
    """The manifest of a matching cache (complete or not), or of a new one created empty."""
    cache = Path(cache)
    if (cache / MANIFEST).is_file():
        have = read_manifest(cache)
        check_matches(cache, have, teacher_identity, data, k)
        return have
    check_replaceable(cache, TEACHER_CACHE)
    m = expected_manifest(teacher_path, teacher_identity, data, k, vocab, shard_examples)
    if is_main:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache / MANIFEST, m)
    return m


def missing_shards(cache: Path, manifest: dict[str, Any]) -> list[int]:
    n, s = int(manifest["data"]["examples"]), int(manifest["shard_examples"])
    return [j for j in range(-(-n // s)) if not (cache / shard_file(j)).is_file()]


def teacher_shard(
    thinker: Any,
    ct: Any,
    data: DistillData,
    first: int,
    count: int,
    k: int,
    batch_size: int,
    device: Any,
    autocast: Callable[[], Any],
) -> dict[str, Any]:
    """The tensors of one shard: the teacher's top-k at every predicted position of its examples."""
    import torch

    from omniedge.training.batches import collate

    values, indices, mass1, mass2 = [], [], [], []
    with torch.no_grad():
        for s in range(first, first + count, batch_size):
            exs = data.examples[s : min(s + batch_size, first + count)]
            b = collate(ct, exs, positions=True, device=device)
            labels = b.pop("labels")
            with autocast():
                logits = thinker(**b, use_cache=False).logits
            rows, _ = rows_at(logits.float(), labels)
            top, idx = torch.topk(rows, k, dim=-1)
            values.append((top - top[:, :1]).to(torch.float16).cpu())
            indices.append(idx.cpu())
            mass1.append(torch.softmax(rows, -1).gather(-1, idx).sum(-1).cpu())
            mass2.append(torch.softmax(rows / 2, -1).gather(-1, idx).sum(-1).cpu())
    counts = data.counts[first : first + count]
    offsets = np.zeros(count + 1, np.int64)
    offsets[1:] = np.cumsum(counts)
    idx_all = torch.cat(indices)
    vocab = thinker.config.text_config.vocab_size
    return {
        "values": torch.cat(values).contiguous(),
        "indices": idx_all.to(torch.int16 if vocab < 2**15 else torch.int32).contiguous(),
        "offsets": torch.from_numpy(offsets),
        "_mass": (float(torch.cat(mass1).mean()), float(torch.cat(mass2).mean())),
    }


def build(
    cache: Path,
    manifest: dict[str, Any],
    thinker: Any,
    tokenizer: Any,
    data: DistillData,
    *,
    device: Any,
    autocast: Callable[[], Any],
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the shards this process owns that are missing; the main process completes the manifest."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from omniedge.training.batches import ChatTokens

    ct = ChatTokens.from_tokenizer(tokenizer)
    k, s, n = int(manifest["k"]), int(manifest["shard_examples"]), len(data.examples)
    todo = [j for j in missing_shards(cache, manifest) if j % world == rank]
    thinker.eval()
    for j in tqdm(todo, desc="teacher top-k", unit="shard", disable=not progress):
        first, count = j * s, min(s, n - j * s)
        t = teacher_shard(thinker, ct, data, first, count, k, batch_size, device, autocast)
        m1, m2 = t.pop("_mass")
        meta = {
            "first": str(first),
            "count": str(count),
            "fingerprint": data.fingerprint,
            "mass_t1": f"{m1:.6f}",
            "mass_t2": f"{m2:.6f}",
        }
        tmp = cache / f".{shard_file(j)}.tmp"
        save_file(t, str(tmp), metadata=meta)
        os.replace(tmp, cache / shard_file(j))
    barrier()
    if rank == 0:
        manifest = finish_manifest(cache, manifest)
    barrier()
    return read_manifest(cache)


def finish_manifest(cache: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """List every shard with its counts and top-k mass; mark the cache complete."""
    from safetensors import safe_open

    s, n = int(manifest["shard_examples"]), int(manifest["data"]["examples"])
    shards = []
    for j in range(-(-n // s)):
        with safe_open(str(cache / shard_file(j)), framework="pt") as h:
            meta = h.metadata()
            tokens = int(h.get_slice("values").get_shape()[0])
        shards.append(
            {"file": shard_file(j), "first": int(meta["first"]), "count": int(meta["count"]), "tokens": tokens,
             "mass_t1": float(meta["mass_t1"]), "mass_t2": float(meta["mass_t2"])}
        )  # fmt: skip
    tokens = sum(x["tokens"] for x in shards)
    out = {
        **manifest,
        "shards": shards,
        "complete": True,
        "mass_t1": sum(x["mass_t1"] * x["tokens"] for x in shards) / max(tokens, 1),
        "mass_t2": sum(x["mass_t2"] * x["tokens"] for x in shards) / max(tokens, 1),
    }
    atomic_write_json(cache / MANIFEST, out)
    return out


class TeacherCache:
    """Reads a complete cache: the teacher's top-k rows for any examples, in batch order."""

    def __init__(self, cache: Path, data: DistillData, k: int) -> None:
        from safetensors import safe_open

        self.dir, self.k = Path(cache), k
        self.manifest = read_manifest(self.dir)
        if not self.manifest.get("complete"):
            raise _refuse(self.dir, "is not complete (an interrupted build)")
        self.shard_examples = int(self.manifest["shard_examples"])
        self._h = [safe_open(str(self.dir / x["file"]), framework="pt") for x in self.manifest["shards"]]
        self._offsets = [h.get_tensor("offsets").numpy() for h in self._h]
        for j, off in enumerate(self._offsets):
            first = j * self.shard_examples
            want = data.counts[first : first + len(off) - 1]
            if len(want) != len(off) - 1 or not np.array_equal(np.diff(off), want):
                raise _refuse(
                    self.dir, f"shard {j} does not match this data's predicted positions (damaged?)"
                )

    def targets(self, example_ids: list[int], device: Any = "cpu") -> TeacherTargets:
        """Top-k logits and token ids [N, k] at the predicted positions of these examples, in order."""
        import torch

        vals, idxs = [], []
        for i in example_ids:
            j, local = divmod(int(i), self.shard_examples)
            a, b = int(self._offsets[j][local]), int(self._offsets[j][local + 1])
            vals.append(self._h[j].get_slice("values")[a:b, : self.k])
            idxs.append(self._h[j].get_slice("indices")[a:b, : self.k])
        values = torch.cat(vals).to(device=device, dtype=torch.float32)
        return TeacherTargets(values, torch.cat(idxs).to(device=device, dtype=torch.long))
