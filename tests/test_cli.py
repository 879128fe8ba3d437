"""The CLI: every subcommand explains itself, and user mistakes end in one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omniedge.cli import main

SUBCOMMANDS = ["compress", "export", "build", "run", "bench", "info", "eval", "serve"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omniedge", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_has_description_and_example(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"omniedge {cmd}" in out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_subcommand(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse formats every subcommand's help line here (a stray % in one crashed `omniedge --help`)."""
    with pytest.raises(SystemExit) as e:
        main([flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: omniedge") and all(cmd in out for cmd in SUBCOMMANDS)
    assert "95% CIs" in out  # eval's help line, % rendered once


def test_subcommand_description_renders_percent_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "95% CIs" in out and "95%%" not in out


def test_installed_command_prints_help() -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "Traceback" not in r.stderr and "COMMAND" in r.stdout


def test_the_console_script_prints_help() -> None:
    """`omniedge --help` as a new user types it: the script pip installed, not `python -m`."""
    import os
    import shutil
    import sysconfig
    from pathlib import Path

    names = ["omniedge.exe", "omniedge"] if os.name == "nt" else ["omniedge"]
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    dirs.append(Path(sysconfig.get_path("scripts", f"{os.name}_user")))
    found = [d / n for d in dirs for n in names if (d / n).is_file()]
    script = str(found[0]) if found else shutil.which("omniedge")
    assert script, "no `omniedge` script: install the package (README command 1) so pip writes it"
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("usage: omniedge")


def test_unknown_option_is_a_usage_error() -> None:
    r = _cli("run", "--no-such-option")
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-option" in r.stderr
    assert "Traceback" not in r.stderr


def test_not_a_checkpoint_is_an_error(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    r = _cli("export", str(tmp_path), "-o", str(tmp_path / "bundle"))
    assert r.returncode == 2
    assert "not a checkpoint" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "bundle").exists()


def test_info_on_missing_path() -> None:
    r = _cli("info", "/definitely/not/here")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_unavailable_execution_provider_is_a_clear_error() -> None:
    r = _cli("run", "--providers", "no-such-provider", "-p", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no-such-provider" in r.stderr and "fix:" in r.stderr


def test_bare_command_and_help_word_print_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`omniedge` alone and `omniedge help [COMMAND]`, as a new user may type them: help, exit 0."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: omniedge") and all(cmd in out for cmd in SUBCOMMANDS)
    assert main(["help"]) == 0 and capsys.readouterr().out == out
    with pytest.raises(SystemExit) as e:
        main(["help", "eval"])
    assert e.value.code == 0 and "omniedge eval" in capsys.readouterr().out
