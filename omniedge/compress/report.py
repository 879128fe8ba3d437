"""`omniedge compress --report`: what compression did to each decoder layer, from omniedge.json.

Per layer: the experts kept (count, and the share of the calibration's routed top-k slots per modality
they took), the saliency distribution (min / median / max over the layer's experts, and the share of the
layer's total saliency the kept experts hold), the quantizer's reconstruction error (per weight: relative
output error on a sample of calibration rows; experts that fell back for lack of tokens), and the layer's
output error after each stage on held-out requests given the teacher's input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniedge.checkpoint import read_meta
from omniedge.errors import OmniedgeError

SHORT = {
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "mlp.experts.gate_up_proj": "gate_up",
    "mlp.experts.down_proj": "down",
}


def layer_report(checkpoint: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(omniedge.json, its per-layer report) of a checkpoint written by `omniedge compress`."""
    meta = read_meta(checkpoint)
    layers = (meta.get("layers") or {}).get("report")
    if not meta or layers is None:
        raise OmniedgeError(
            f"{checkpoint} has no per-layer compression report in its omniedge.json",
            "pass a checkpoint written by this version of `omniedge compress`, or compress again",
        )
    return meta, layers


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def rows(layers: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column names and one row of strings per layer."""
    stages = [s for s in ("prune", "reconstruct", "quantize") if any(s in r for r in layers)]
    cols = ["layer"]
    if "prune" in stages:
        cols += ["kept", "routed slots kept (t/i/a)", "saliency min / med / max", "saliency kept"]
    if "reconstruct" in stages:
        cols += ["calibration error before -> after reconstruct"]
    if "quantize" in stages:
        cols += ["weight error (rel.)", "fallback experts"]
    cols += [f"out err {s}" for s in stages]
    out = []
    for r in layers:
        row = [str(r["layer"])]
        p = r.get("prune")
        if "prune" in stages:
            if p:
                share = p.get("routed_share_kept", {})
                q = p["saliency"]["quantiles"]
                row += [
                    str(p["experts"]),
                    " / ".join(_pct(share.get(m)) for m in ("text", "image", "audio")),
                    f"{q[0]:.3g} / {q[2]:.3g} / {q[4]:.3g}",
                    _pct(p["saliency"].get("kept_share")),
                ]
            else:
                row += ["dense", "", "", ""]
        if "reconstruct" in stages:
            c = r.get("reconstruct")
            text = f"{c['error_before']:.2e} -> {c['error_after']:.2e}" if c else "-"
            if c and "block" in c:  # fit: block, its held-out fifth of the tokens
                text += f"; block {c['block']['held_out_before']:.2e} -> {c['block']['held_out_after']:.2e} held out"
            row.append(text)
        if "quantize" in stages:
            q = r.get("quantize") or {}
            row.append(
                " ".join(f"{SHORT.get(k, k)} {v['error']:.2e}" for k, v in q.items() if "error" in v) or "-"
            )
            row.append(str(sum(v.get("fallback_experts", 0) for v in q.values())))
        row += [f"{r.get('output_error', {}).get(s, float('nan')):.2e}" for s in stages]
        out.append(row)
    return cols, out


def print_report(checkpoint: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    meta, layers = layer_report(checkpoint)
    recipe = " -> ".join(
        f"{s['name']} ({', '.join(f'{k}={v}' for k, v in s['settings'].items() if v not in (None, {}))})"
        for s in meta.get("stages", [])
    )
    cols, body = rows(layers)
    t = Table(title=f"{checkpoint}: {recipe}", title_justify="left")
    for c in cols:
        t.add_column(c, justify="left" if c.startswith("weight") else "right")
    for row in body:
        t.add_row(*row)
    console = Console()
    Console(width=max(console.width, 200)).print(t)  # never cut a number off in a narrow terminal or a pipe
