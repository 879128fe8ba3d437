"""Make the omni-mini float16-on-GPU parity inputs on a CPU machine: `python bench/h200/make_parity_data.py OUT`.

omni-mini compressed by the default recipe, its CPU (float32) and CUDA (float16) bundles, 8 held-out requests
of each evaluation task (text, image question, speech transcription, spoken question about an image) from
the omni-mini data set's test split, and transformers' greedy reference for them (bench/parity.py).
OUT/mini-gpu and OUT/ref.npz then travel to the GPU machine (`fullsize.sh parity`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omniedge.bench.parity import make, save_requests
from omniedge.compress.pipeline import compress
from omniedge.compress.recipe import default_recipe
from omniedge.data import build_dataset
from omniedge.export.bundle import export_bundle
from omniedge.runtime.media import load_audio, load_image
from omniedge.training.batches import ASR_PROMPT, read_records

PER_TASK = 8


def requests(root: Path) -> list[dict]:
    out: list[dict] = []
    for r in read_records(root, "text", "test")[:PER_TASK]:
        words = str(r["text"]).split()
        out.append({"kind": "text", "prompt": " ".join(words[: max(4, len(words) // 2)])})
    for task in ("image", "speech", "mixed"):
        for r in read_records(root, task, "test")[:PER_TASK]:
            req = {"kind": task, "prompt": ASR_PROMPT if task == "speech" else r.get("prompt", "")}
            if r.get("image"):
                req["image"] = load_image(root / r["image"])
            if r.get("audio"):
                req["audio"] = load_audio(root / r["audio"], 16000, 30.0)
            out.append(req)
    return out


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = build_dataset(size="small")
    ckpt = compress("omni-mini", out / "mini-int4", default_recipe(), progress=False)
    cpu = export_bundle(ckpt, out / "mini-cpu", progress=False)
    export_bundle(ckpt, out / "mini-gpu", device="cuda", progress=False)
    save_requests(out / "requests.npz", requests(Path(data)))
    make(ckpt, cpu, out / "requests.npz", out / "ref.npz", new_tokens=32)
    print(f"parity data in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
