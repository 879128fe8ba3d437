"""`omniedge bench` beyond the defaults: decode at given prompt lengths, transformers on the same checkpoint in
the same run (a ratio, not an absolute claim on a shared CPU), and `--compare` of two reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omniedge.bench.compare import compare
from omniedge.bench.harness import bench_cli, run_bench
from omniedge.bench.report import markdown
from omniedge.errors import OmniedgeError


@pytest.fixture(scope="module")
def report(bundle: Path, checkpoint: Path) -> dict:
    return run_bench(bundle, runs=2, new_tokens=6, progress=False, contexts=[16, 40], baseline=checkpoint)


def test_decode_at_depth_with_a_transformers_baseline(report: dict) -> None:
    depth = report["contexts"]
    assert [c["context"] for c in depth] == [16, 40]
    for c in depth:
        assert c["token_ms"]["n"] == 2 * 5  # two runs of 6 tokens, the first of each excluded
        assert c["token_ms"]["p50"] > 0 and c["token_ms"]["p99"] is None  # 10 samples: no p99 claimed
        assert c["spread"]["runs"] == 2 and c["speedup_vs_baseline"] > 0
        assert c["ttft_first_request_ms"] > 0  # the run the percentiles leave out, reported on its own
    base = report["baseline"]
    assert base["engine"] == "transformers" and [c["context"] for c in base["contexts"]] == [16, 40]
    md = markdown(report)
    assert "| 16 |" in md and "transformers per token" in md and "Baseline: transformers" in md


def test_compare_prints_ratios(report: dict, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report))
    slower = json.loads(json.dumps(report))
    slower["token_ms"]["p50"] *= 2
    for c in slower["contexts"]:
        c["token_ms"]["p50"] *= 3
    b.write_text(json.dumps(slower))
    table = compare(a, b)
    assert "| per-token p50, ms |" in table and "| 2.000 | A |" in table
    assert "| per-token p50 at 40 tokens, ms |" in table and "| 3.000 | A |" in table
    (tmp_path / "a.md").write_text("# omniedge bench")
    with pytest.raises(OmniedgeError, match="not a JSON bench report"):
        compare(a, tmp_path / "a.md")


def test_baseline_needs_contexts(bundle: Path, checkpoint: Path) -> None:
    with pytest.raises(OmniedgeError, match="--contexts"):
        bench_cli(str(bundle), runs=1, new_tokens=2, json_path=None, baseline=checkpoint)


def test_thinker_probe_runs_the_thinker_alone_in_a_child(bundle: Path) -> None:
    """The probe thinker_report and the kernel sweep use: a fresh process, the thinker only, decode and TTFT at
    each context, the greedy tokens of its last run (the same prompt every time: kernel choices compare)."""
    from omniedge.bench.thinker_probe import run_child

    a = run_child(bundle, "cpu", [8, 20], new_tokens=4, runs=2)
    assert "error" not in a, a.get("error")
    assert [c["context"] for c in a["contexts"]] == [8, 20] and a["settings"] == {}
    assert all(c["token_ms"]["n"] == 2 * 3 and len(c["last_run_tokens"]) == 4 for c in a["contexts"])
    b = run_child(bundle, "cpu", [8], new_tokens=4, runs=2)
    assert b["contexts"][0]["last_run_tokens"] == a["contexts"][0]["last_run_tokens"]
    bad = run_child(bundle / "missing", "cpu", [8], new_tokens=4, runs=1)  # the child's failure comes back
    assert bad["returncode"] != 0 and "missing" in bad["error"]
