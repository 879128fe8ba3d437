"""Bench report files: the JSON (every number) and a Markdown summary beside it, both written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_write_bytes, atomic_write_json
from omniedge.bench.stats import describe
from omniedge.outputs import BENCH_JSON, BENCH_MARKDOWN, check_replaceable_file


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(r: dict[str, Any]) -> str:
    mach = r["machine"]
    tok, img, sp = r["token_ms"], r["image_ms"], r["speech_in"]
    loads = ", ".join(f"{k} {v:.2f} s" for k, v in r["load_s"].items() if k != "total")
    lines = [
        f"# omniedge bench: {r['bundle']['model']}",
        "",
        f"- command: `{r['command']}`",
        f"- machine: {mach['cpu']} ({mach['cores']} cores, {mach['ram_gib']} GiB), GPU {mach['gpu'] or 'none'}, "
        f"onnxruntime {mach['onnxruntime']} with {r['providers']}",
        f"- when: {r['when']}, omniedge {r['omniedge']}, {r['runs']} runs per measurement",
        "",
        "| metric | value |",
        "|---|---|",
        f"| load (all engines) | {r['load_s']['total']:.2f} s ({loads}) |",
        f"| time to first token, text prompt (n={r['ttft_ms_text'].get('n', 0)}) | "
        f"{describe(r['ttft_ms_text'], ('p50', 'p90'))} |",
        f"| time to first token, image + audio + text (n={r['ttft_ms_image_audio'].get('n', 0)}) | "
        f"{describe(r['ttft_ms_image_audio'], ('p50',))} |",
        f"| per-token latency (first excluded, n={tok.get('n', 0)}) | {describe(tok)}"
        f"{_spread(r.get('token_ms_spread'))} |",
        f"| decode throughput | {_f(r['decode_tok_s'], '{:.1f}')} tokens/s |",
        f"| image latency (preprocess + encode, {img.get('size')}, n={img.get('n', 0)}) | "
        f"{describe(img, ('p50',))} (preprocess {_f(img.get('preprocess_mean'))} ms) |",
        f"| speech in, real-time factor ({sp['audio_s']:.0f} s clip) | {_f(sp['rtf'], '{:.4f}')} "
        f"({describe(sp['process_ms'], ('p50',))}) |",
        f"| peak RSS | {r['memory']['peak_rss_mib']:.0f} MiB (engines {r['memory']['engines_footprint_mib']:.0f} MiB) |",
        f"| power | {_f(r['power_w'], '{:.1f} W') if r['power_w'] is not None else 'not readable here'} |",
        "",
    ]
    return "\n".join(lines + _depth_lines(r))


def _spread(s: dict[str, Any] | None) -> str:
    if not s or "relative_range" not in s:
        return ""
    return f"; run-to-run spread of the medians {s['relative_range']:.1%} over {s['runs']} runs"


def _depth_lines(r: dict[str, Any]) -> list[str]:
    """Decode at depth (`--contexts`) and, with `--baseline`, transformers on the same checkpoint."""
    if not r.get("contexts"):
        return []
    base = {c["context"]: c for c in (r.get("baseline") or {}).get("contexts", [])}
    lines = [
        "| prompt tokens | decode per token | time to first token | spread | transformers per token | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["contexts"]:
        b = base.get(c["context"])
        theirs = describe(b["token_ms"], ("p50",)) if b else "-"
        lines.append(
            f"| {c['context']} | {describe(c['token_ms'])} | {describe(c['ttft_ms'], ('p50',))} | "
            f"{c['spread'].get('relative_range', 0):.1%} | {theirs} | {_f(c.get('speedup_vs_baseline'), '{:.2f}x')} |"
        )
    if r.get("baseline"):
        b = r["baseline"]
        lines.append(
            f"\nBaseline: transformers {b['transformers']} ({b['dtype']}, {b['device']}, experts "
            f"{b['experts_implementation']}) on {b['checkpoint']}, run in a child process."
        )
    return [*lines, ""]


def check_report_paths(json_path: Path) -> None:
    """Refuse, before any measuring, to overwrite files that are not earlier bench reports."""
    check_replaceable_file(json_path, BENCH_JSON)
    check_replaceable_file(Path(json_path).with_suffix(".md"), BENCH_MARKDOWN)


def write_reports(report: dict[str, Any], json_path: Path) -> str:
    json_path = Path(json_path)
    check_report_paths(json_path)
    atomic_write_json(json_path, report)
    md = markdown(report)
    atomic_write_bytes(json_path.with_suffix(".md"), md.encode())
    return md
