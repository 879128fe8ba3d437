"""One rule for every command that writes an output: replace only a previous output of the same kind.

An existing directory is replaced only when it is empty or holds the marker file that the same kind of
writer leaves (a bundle's manifest.json, a checkpoint's omniedge.json, ...); an existing report file only
when it reads as a report of the same kind. Anything else is refused with one clear error before any
work starts, so no command deletes a folder or a file the user did not ask it to replace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniedge.errors import OmniedgeError


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _has_keys(*keys: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        data = _json_object(path)
        return data is not None and all(k in data for k in keys)

    return check


def _any_file(_path: Path) -> bool:
    return True


@dataclass(frozen=True)
class OutputKind:
    """A kind of directory output, recognised by a marker file that only its writer leaves."""

    name: str  # "engine bundle"
    marker: str  # file inside the directory ("manifest.json")
    made_by: str  # the command or function that writes it
    recognise: Callable[[Path], bool] = _any_file  # checks the marker's content

    def holds(self, directory: Path) -> bool:
        marker = directory / self.marker
        return marker.is_file() and self.recognise(marker)


@dataclass(frozen=True)
class ReportKind:
    """A kind of single-file output (a JSON or Markdown report), recognised by its content."""

    name: str
    made_by: str
    recognise: Callable[[Path], bool]


BUNDLE = OutputKind(
    "engine bundle", "manifest.json", "omniedge export", _has_keys("schema_version", "components")
)
CHECKPOINT = OutputKind("omniedge checkpoint", "omniedge.json", "omniedge compress", _has_keys())
DATASET = OutputKind(
    "omni-mini dataset",
    "manifest.json",
    "omniedge.data.build_dataset",
    lambda p: (_json_object(p) or {}).get("name") == "omni-mini-data",
)
TRAINING_PACK = OutputKind(
    "training pack", "pack.json", "omniedge.training.pack.write_pack", _has_keys("schema")
)
WRITTEN_CHECKPOINT = OutputKind(
    "written Qwen3-Omni checkpoint",
    "model.safetensors.index.json",
    "omniedge.random_source",
    _has_keys("weight_map"),
)
CALIBRATION_PACK = OutputKind(
    "calibration pack", "pack.json", "omniedge.compress.calibration_pack", _has_keys("splits", "counts")
)
TEACHER_CACHE = OutputKind(
    "teacher-logit cache",
    "manifest.json",
    "omniedge distill --teacher-cache",
    lambda p: (_json_object(p) or {}).get("format") == "omniedge-teacher-topk",
)
DISTILL_RUN = OutputKind("distillation run directory", "run.json", "omniedge distill", _has_keys("key"))
TEXT_SOURCE = OutputKind("unpacked text source", ".complete", "omniedge.data.sources.fetch")
DEFAULT_BUNDLE_CACHE = OutputKind("cached default bundle", ".complete", "omniedge.defaults.default_bundle")

BENCH_JSON = ReportKind(
    "omniedge bench JSON report", "omniedge bench --json", _has_keys("omniedge", "machine", "token_ms")
)
EVAL_JSON = ReportKind("omniedge eval JSON report", "omniedge eval --json", _has_keys("schema"))


def _starts_with(prefix: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            with path.open(encoding="utf-8") as f:
                return f.read(len(prefix)) == prefix
        except (OSError, UnicodeDecodeError):
            return False

    return check


BENCH_MARKDOWN = ReportKind(
    "omniedge bench Markdown report", "omniedge bench --json", _starts_with("# omniedge bench")
)


def check_replaceable(path: str | Path, kind: OutputKind) -> None:
    """Return if `path` is free, an empty directory, or a previous `kind`; else one clear error."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if not p.is_dir():
        raise OmniedgeError(
            f"{p} exists and is a file, not a directory; refusing to replace it with a new {kind.name}",
            "pass a new directory path",
        )
    if not any(p.iterdir()) or kind.holds(p):
        return
    raise OmniedgeError(
        f"{p} already exists and is not a previous {kind.name} (it has no {kind.marker} written by "
        f"{kind.made_by}); refusing to replace what is in it",
        f"write to a new or empty directory, or delete {p} yourself if you mean to replace it",
    )


def check_replaceable_file(path: str | Path, kind: ReportKind) -> None:
    """Return if `path` is free or a previous report of `kind`; else one clear error."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_dir():
        raise OmniedgeError(f"{p} is a directory, not a file for the {kind.name}", "pass a file path")
    if not kind.recognise(p):
        raise OmniedgeError(
            f"{p} already exists and is not a previous {kind.name} (from {kind.made_by}); refusing to overwrite it",
            f"pass a new file name, or delete {p} yourself if you mean to replace it",
        )
