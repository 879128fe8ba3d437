"""A variant of an exported thinker graph over the same weights file, and its logits against the bundle's on
one prompt: `python bench/h200/graph_variant.py CHECKPOINT BUNDLE OUT_BUNDLE [--qk-norm fused] [--moe-kernel omniedge]`
(the omniedge MoE kernel needs its library where the runtime looks: kernels/moe_int4/README.md).

Every file but the graph and the manifest is hard-linked (the `.data` is the same bytes); the new graph is
written with `export_thinker_ort(..., data_of=...)`, the manifest records the options. The check: a random
256-token prompt's prefill and one decode step through both bundles on the CUDA provider, max |diff| over
max |ref| and the two argmaxes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from omniedge.export.onnx_io import component_record
from omniedge.export.thinker_ort import Options, export_thinker_ort
from omniedge.export.thinker_spec import MOE_KERNELS, custom_ops_of
from omniedge.runtime.app import Omni
from omniedge.weights import SafetensorsDir


def make_variant(src: Path, a: Path, b: Path, opts: Options) -> None:
    b.mkdir(exist_ok=True)
    for f in a.iterdir():
        if f.name not in ("thinker.onnx", "manifest.json") and not (b / f.name).exists():
            os.link(f, b / f.name)
    m = json.loads((a / "manifest.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    nd = m["text"]["num_deepstack"]
    export_thinker_ort(SafetensorsDir(src), cfg, b / "thinker.onnx", nd, opts, False, a / "thinker.onnx")
    m["components"]["thinker"] = component_record(b / "thinker.onnx", b)
    m["thinker_graph"].update(fused_qk_norm=opts.fused_qk_norm, moe_kernel=opts.moe_kernel)
    m["thinker_graph"]["custom_ops"] = custom_ops_of(opts.moe_kernel)
    if opts.fused_qk_norm:
        m["thinker_graph"]["providers"] = ["CUDAExecutionProvider"]
    (b / "manifest.json").write_text(json.dumps(m))


def compare(a: Path, b: Path, providers: str) -> dict[str, dict[str, float]]:
    outs = []
    for d in (a, b):
        o = Omni.load(d, providers=providers, max_context=1024)
        ids = np.random.default_rng(0).integers(0, o.embed_table.shape[0], 256)
        x = np.asarray(o.embed_table[ids], np.float32)[None]
        deep = np.zeros((o.manifest.text.num_deepstack, 1, 256, x.shape[-1]), np.float32)
        first = o.thinker.prefill(x, np.broadcast_to(np.arange(256), (3, 256)), deep)
        l1 = first.logits()
        l2 = o.thinker.decode(o.embed_table[int(l1.argmax())], 256).logits()
        outs.append((l1, l2))
        o.close()
    report = {}
    for k, name in enumerate(("prefill", "decode")):
        r, f = outs[0][k], outs[1][k]
        report[name] = {
            "max_diff_over_max_ref": float(np.abs(f - r).max() / np.abs(r).max()),
            "argmax_ref": int(r.argmax()),
            "argmax_variant": int(f.argmax()),
        }
        print(f"{name}: variant vs bundle {report[name]}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--qk-norm", choices=["fused", "separate"], default=None, help="default: as the bundle's")
    p.add_argument("--moe-kernel", choices=MOE_KERNELS, default=None, help="default: as the bundle's")
    p.add_argument("--providers", default="cuda")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    tg = json.loads((a.bundle / "manifest.json").read_text())["thinker_graph"]
    fused = tg.get("fused_qk_norm", False) if a.qk_norm is None else a.qk_norm == "fused"
    moe = a.moe_kernel or tg.get("moe_kernel", "qmoe")
    make_variant(
        a.checkpoint, a.bundle, a.out, Options(dtype=tg["dtype"], fused_qk_norm=fused, moe_kernel=moe)
    )
    report = compare(a.bundle, a.out, a.providers)
    if a.json:
        a.json.write_text(json.dumps({"fused_qk_norm": fused, "moe_kernel": moe, **report}, indent=1))


if __name__ == "__main__":
    main()
