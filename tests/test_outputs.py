"""No command deletes what the user did not ask it to replace: every writer replaces only a previous output
of the same kind (omniedge.outputs), and refuses anything else with one clear error, before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from omniedge.atomic import atomic_dir
from omniedge.errors import OmniedgeError
from omniedge.outputs import (
    BUNDLE,
    CHECKPOINT,
    DATASET,
    TRAINING_PACK,
    check_replaceable,
)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in __import__("os").environ.items()}
    env["OMNIEDGE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "omniedge", *args], capture_output=True, text=True, timeout=600, env=env
    )


def _work_folder(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    (d / "notes.txt").write_text("a week of notes")
    (d / "sub").mkdir()
    (d / "sub" / "data.csv").write_text("1,2,3")
    return d


def _untouched(d: Path) -> bool:
    return (d / "notes.txt").read_text() == "a week of notes" and (
        d / "sub" / "data.csv"
    ).read_text() == "1,2,3"


def test_export_refuses_a_folder_of_other_files(tmp_path: Path) -> None:
    """The reported case: `omniedge export CKPT -o DIR` on a work folder wiped it. Now: one error, exit 2."""
    pytest.importorskip("torch")
    work = _work_folder(tmp_path)
    r = _cli("export", "tiny", "-o", str(work), home=tmp_path / "home")
    assert r.returncode == 2, r.stderr
    assert "is not a previous engine bundle" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert _untouched(work) and sorted(p.name for p in work.iterdir()) == ["notes.txt", "sub"]


def test_export_refuses_a_file(tmp_path: Path) -> None:
    f = tmp_path / "report.txt"
    f.write_text("keep")
    with pytest.raises(OmniedgeError, match="is a file"):
        check_replaceable(f, BUNDLE)
    assert f.read_text() == "keep"


def test_each_kind_replaces_only_its_own_outputs(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"schema_version": 1, "components": {}}))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "manifest.json").write_text(json.dumps({"name": "omni-mini-data"}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "omniedge.json").write_text(json.dumps({"schema": 1}))
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "pack.json").write_text(json.dumps({"schema": 1}))
    empty = tmp_path / "empty"
    empty.mkdir()
    own = {BUNDLE: bundle, DATASET: dataset, CHECKPOINT: ckpt, TRAINING_PACK: pack}
    for kind, folder in own.items():
        check_replaceable(folder, kind)  # a previous output of the same kind: may be replaced
        check_replaceable(empty, kind)
        check_replaceable(tmp_path / "new", kind)
        for other in own.values():
            if other is not folder:
                with pytest.raises(OmniedgeError, match=f"not a previous {kind.name}"):
                    check_replaceable(other, kind)
    # A manifest.json that is not a bundle's (damaged, or someone else's) is not taken for one.
    (bundle / "manifest.json").write_text("[]")
    with pytest.raises(OmniedgeError, match="not a previous engine bundle"):
        check_replaceable(bundle, BUNDLE)


def test_atomic_dir_refuses_before_the_work_and_leaves_no_temp(tmp_path: Path) -> None:
    work = _work_folder(tmp_path)
    ran = []
    with pytest.raises(OmniedgeError, match="refusing to replace"), atomic_dir(work, BUNDLE):
        ran.append(1)
    assert not ran and _untouched(work)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_atomic_dir_refuses_what_appeared_during_the_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OmniedgeError, match="refusing to replace"), atomic_dir(out, BUNDLE) as tmp:
        (tmp / "manifest.json").write_text("{}")
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    assert (out / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_replaces_a_previous_output_of_its_kind(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    for n in range(2):
        with atomic_dir(out, BUNDLE) as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"schema_version": 1, "components": {"n": n}}))
    assert json.loads((out / "manifest.json").read_text())["components"] == {"n": 1}


def test_training_pack_and_training_refuse_a_foreign_folder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    from omniedge.training.pack import write_pack
    from omniedge.training.train import TrainConfig, train

    work = _work_folder(tmp_path)
    with pytest.raises(OmniedgeError, match="not a previous training pack"):
        write_pack(tmp_path / "no-dataset", work, Tokenizer(models.BPE()), image_size=64)
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "pack.json").write_text(json.dumps({"schema": 1, "image_size": 64}))
    with pytest.raises(OmniedgeError, match="not a previous omniedge checkpoint"):
        train(pack, work, TrainConfig(), "cpu")
    with pytest.raises(OmniedgeError, match="not a training run state"):
        train(pack, tmp_path / "new", TrainConfig(), "cpu", state_dir=work)
    assert _untouched(work)


def test_bench_and_eval_reports_refuse_to_overwrite_other_files(tmp_path: Path) -> None:
    from omniedge.bench.harness import bench_cli
    from omniedge.eval.cli import eval_cli

    mine = tmp_path / "results.json"
    mine.write_text('{"my": "numbers"}')
    with pytest.raises(OmniedgeError, match="not a previous omniedge bench JSON report"):
        bench_cli(str(tmp_path / "no-bundle"), runs=1, new_tokens=2, json_path=mine)
    md = tmp_path / "r.md"
    md.write_text("# my notes\n")
    with pytest.raises(OmniedgeError, match="not a previous omniedge bench Markdown report"):
        bench_cli(str(tmp_path / "no-bundle"), runs=1, new_tokens=2, json_path=tmp_path / "r.json")
    with pytest.raises(OmniedgeError, match="not a previous omniedge eval JSON report"):
        eval_cli("omni-mini", json_path=mine)
    assert mine.read_text() == '{"my": "numbers"}' and md.read_text() == "# my notes\n"
