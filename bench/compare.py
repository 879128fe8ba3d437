"""`omniedge bench --compare A.json B.json`: two bench reports side by side, with B / A ratios.

Only numbers both reports measured are compared; a ratio is flagged as within noise when it is closer
to 1 than the larger run-to-run spread either report measured for that metric (when they recorded one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omniedge.errors import OmniedgeError

# (label, path into the report, lower is better)
METRICS: list[tuple[str, tuple[str, ...], bool]] = [
    ("load total, s", ("load_s", "total"), True),
    ("TTFT text p50, ms", ("ttft_ms_text", "p50"), True),
    ("TTFT image+audio p50, ms", ("ttft_ms_image_audio", "p50"), True),
    ("per-token p50, ms", ("token_ms", "p50"), True),
    ("per-token p90, ms", ("token_ms", "p90"), True),
    ("decode tokens/s", ("decode_tok_s",), False),
    ("image latency p50, ms", ("image_ms", "p50"), True),
    ("speech-in RTF", ("speech_in", "rtf"), True),
    ("peak RSS, MiB", ("memory", "peak_rss_mib"), True),
]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise OmniedgeError(
            f"bench report not found: {path}", "pass the JSON written by `omniedge bench --json`"
        ) from e
    except json.JSONDecodeError as e:
        raise OmniedgeError(f"{path} is not a JSON bench report ({e})", "pass the .json, not the .md") from e


def _get(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = report
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return float(v) if isinstance(v, int | float) else None


def _depth_rows(
    a: dict[str, Any], b: dict[str, Any]
) -> Iterator[tuple[str, float, float, bool, float | None]]:
    """Decode-at-depth entries (`contexts`) both reports have, matched by context length."""
    bc = {c["context"]: c for c in b.get("contexts") or []}
    for ca in a.get("contexts") or []:
        cb = bc.get(ca["context"])
        if cb is None:
            continue
        noise = max(
            ca.get("spread", {}).get("relative_range", 0), cb.get("spread", {}).get("relative_range", 0)
        )
        for label, key in (("per-token p50", "token_ms"), ("TTFT", "ttft_ms")):
            x, y = ca[key].get("p50", ca[key].get("mean")), cb[key].get("p50", cb[key].get("mean"))
            if x and y:
                yield f"{label} at {ca['context']} tokens, ms", x, y, True, noise or None


def compare(a_path: Path, b_path: Path) -> str:
    """Markdown table of B against A."""
    a, b = _read(a_path), _read(b_path)
    rows: list[tuple[str, float, float, bool, float | None]] = []
    for label, path, lower in METRICS:
        x, y = _get(a, path), _get(b, path)
        if x is not None and y is not None and x > 0:
            rows.append((label, x, y, lower, None))
    rows += list(_depth_rows(a, b))
    if not rows:
        raise OmniedgeError(
            f"{a_path} and {b_path} have no metric in common", "compare two `omniedge bench` reports"
        )
    lines = [
        f"| metric | A: {Path(a_path).name} | B: {Path(b_path).name} | B / A | better |",
        "|---|---|---|---|---|",
    ]
    for label, x, y, lower, noise in rows:
        ratio = y / x
        if noise is not None and abs(ratio - 1) <= noise:
            verdict = "within noise"
        elif ratio == 1:
            verdict = "same"
        else:
            verdict = "B" if (ratio < 1) == lower else "A"
        lines.append(f"| {label} | {x:.4g} | {y:.4g} | {ratio:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"
