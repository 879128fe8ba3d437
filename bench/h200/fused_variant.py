"""The fused q/k-norm variant of an exported float16 thinker, over the same weights file, and its logits against
the separate-norm graph on one prompt: `python bench/h200/fused_variant.py CHECKPOINT BUNDLE OUT_BUNDLE`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from omniedge.export.onnx_io import component_record
from omniedge.export.thinker_ort import Options, export_thinker_ort
from omniedge.runtime.app import Omni
from omniedge.weights import SafetensorsDir


def main(src: Path, a: Path, b: Path) -> None:
    b.mkdir(exist_ok=True)
    for f in a.iterdir():  # every file but the graph and the manifest, hard-linked (the .data is the same)
        if f.name not in ("thinker.onnx", "manifest.json") and not (b / f.name).exists():
            os.link(f, b / f.name)
    m = json.loads((a / "manifest.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    opts = Options(dtype="float16", fused_qk_norm=True)
    export_thinker_ort(
        SafetensorsDir(src),
        cfg,
        b / "thinker.onnx",
        m["text"]["num_deepstack"],
        opts,
        False,
        a / "thinker.onnx",
    )
    m["components"]["thinker"] = component_record(b / "thinker.onnx", b)
    m["thinker_graph"].update(fused_qk_norm=True, providers=["CUDAExecutionProvider"])
    (b / "manifest.json").write_text(json.dumps(m))
    outs = []
    for d in (a, b):
        o = Omni.load(d, providers="cuda", max_context=1024)
        ids = np.random.default_rng(0).integers(0, o.embed_table.shape[0], 256)
        x = np.asarray(o.embed_table[ids], np.float32)[None]
        deep = np.zeros((o.manifest.text.num_deepstack, 1, 256, x.shape[-1]), np.float32)
        first = o.thinker.prefill(x, np.broadcast_to(np.arange(256), (3, 256)), deep)
        l1 = first.logits()
        l2 = o.thinker.decode(o.embed_table[int(l1.argmax())], 256).logits()
        outs.append((l1, l2))
        o.close()
    for k, name in enumerate(("prefill", "decode")):
        r, f = outs[0][k], outs[1][k]
        err = float(np.abs(f - r).max() / np.abs(r).max())
        print(
            f"{name}: fused vs separate max|diff|/max|ref| {err:.2e}, argmax {int(r.argmax())} / {int(f.argmax())}"
        )


if __name__ == "__main__":
    main(*(Path(p) for p in sys.argv[1:4]))
