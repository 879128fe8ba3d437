"""Damaged bundles and checkpoints: `omniedge info` runs the checks `omniedge run` makes (and the checksums),
and both end in one `error: ... fix: ...` (exit 2), never a traceback and never "healthy"."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from omniedge.cli import main


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _edit(b: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_a_healthy_bundle_is_described_and_checked(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "info", str(bundle))
    assert code == 0 and "health   ok" in out and "checksums match" in out and "thinker" in out


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[]", "is not a JSON object"),
        ("{}", "schema_version"),
    ],
)
def test_unreadable_manifests(copy: Path, capsys: pytest.CaptureFixture[str], text: str, says: str) -> None:
    (copy / "manifest.json").write_text(text)
    for cmd in (["info", str(copy)], ["run", str(copy), "-p", "hi"]):
        code, _, err = _cli(capsys, *cmd)
        assert code == 2 and says in err and "fix:" in err, (cmd, err)


def test_unknown_schema_version(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(copy, lambda m: m.update(schema_version=99))
    for cmd in (["info", str(copy)], ["run", str(copy), "-p", "hi"]):
        code, _, err = _cli(capsys, *cmd)
        assert code == 2 and "schema_version 99" in err and "upgrade omniedge" in err


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["components"]["thinker"].update(onnx="../../../etc/passwd"),
        lambda m: m.update(tokenizer="/etc/passwd"),
        lambda m: m["embed_tokens"].update(file="../outside.npy"),
        lambda m: m["components"]["vision"]["sha256"].update({"../../x.data": "0" * 64}),
    ],
    ids=["onnx-dotdot", "tokenizer-absolute", "embed-dotdot", "checksum-name"],
)
def test_paths_outside_the_bundle_are_refused(
    copy: Path, capsys: pytest.CaptureFixture[str], edit: Any
) -> None:
    _edit(copy, edit)
    for cmd in (["info", str(copy)], ["run", str(copy), "-p", "hi"]):
        code, _, err = _cli(capsys, *cmd)
        assert code == 2 and "outside the bundle directory" in err and "refusing to open it" in err, err


def test_a_symlink_out_of_the_bundle_is_refused(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(secret)
    code, _, err = _cli(capsys, "run", str(copy), "-p", "hi")
    assert code == 2 and "outside the bundle directory" in err


def test_fields_of_the_wrong_type(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(copy, lambda m: m["special_tokens"].update(im_start="not a number"))
    code, _, err = _cli(capsys, "info", str(copy))
    assert code == 2 and "special_tokens must be a list of integers" in err
    _edit(
        copy,
        lambda m: (m["special_tokens"].update(im_start=1), m["preprocess"]["image"].update(size=["a", 2])),
    )
    code, _, err = _cli(capsys, "run", str(copy), "-p", "hi")
    assert code == 2 and "wrong type or shape" in err


def test_a_tiny_engine_and_a_damaged_file_are_reported(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = b"\x00" * 111  # what an interrupted copy of an engine looked like
    (copy / "vision.engine").write_bytes(stub)

    def add_engine(m: dict[str, Any]) -> None:
        m["components"]["vision"]["engine"] = "vision.engine"
        m["components"]["vision"]["sha256"]["vision.engine"] = hashlib.sha256(stub).hexdigest()

    _edit(copy, add_engine)
    onnx = copy / "audio.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    code, out, err = _cli(capsys, "info", str(copy))
    assert code == 2 and "is damaged:" in err
    assert "vision.engine is 111 bytes: too small to be a TensorRT engine" in err
    assert "audio.onnx is damaged (sha256" in err
    assert "thinker" in out  # what could be read is still described


def test_a_missing_file(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "embed_tokens.npy").unlink()
    for cmd in (["info", str(copy)], ["run", str(copy), "-p", "hi"]):
        code, _, err = _cli(capsys, *cmd)
        assert code == 2 and "incomplete: missing embed_tokens.npy" in err


@pytest.fixture()
def ckpt(checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


@pytest.mark.parametrize("name", ["config.json", "omniedge.json"])
@pytest.mark.parametrize("text", ["{broken", "[]", ""])
def test_damaged_checkpoint_json(
    ckpt: Path, capsys: pytest.CaptureFixture[str], name: str, text: str
) -> None:
    (ckpt / name).write_text(text)
    for cmd in (["info", str(ckpt)], ["export", str(ckpt), "-o", str(ckpt.parent / "b")]):
        code, _, err = _cli(capsys, *cmd)
        assert code == 2 and name in err and "fix:" in err, (cmd, err)
    assert not (ckpt.parent / "b").exists()


def test_checkpoint_info(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "info", str(checkpoint))
    assert code == 0 and "6 experts top-" in out and "quantized" in out
