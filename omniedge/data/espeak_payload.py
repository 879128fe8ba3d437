"""The installed espeakng-loader wheel as a small tarball for a machine without network (the H200 one):
the package, its library and its espeak-ng data with only the English dictionary (about 0.65 MB in
xz instead of 10 MB). Unpacked into a directory on PYTHONPATH, `import espeakng_loader` works there.

    python -m omniedge.data.espeak_payload .whl/espeakng_loader-en.tar.xz
"""

from __future__ import annotations

import sys
import tarfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from omniedge.atomic import atomic_write_bytes
from omniedge.errors import OmniedgeError

KEEP_DICTIONARIES = ("en_dict",)


def _keep(rel: Path) -> bool:
    if "__pycache__" in rel.parts:
        return False
    return not (rel.name.endswith("_dict") and rel.name not in KEEP_DICTIONARIES)


def make_payload(out: str | Path) -> Path:
    """Write the English-only tarball of the installed espeakng-loader (and its dist-info) to `out`."""
    import io

    try:
        dist = distribution("espeakng-loader")
    except PackageNotFoundError as e:
        raise OmniedgeError("espeakng-loader is not installed", "pip install espeakng-loader") from e
    site = Path(str(dist.locate_file("")))
    files = sorted(p for p in (site / "espeakng_loader").rglob("*") if p.is_file())
    info = Path(str(dist._path))  # type: ignore[attr-defined]  # the .dist-info directory
    files += sorted(p for p in info.rglob("*") if p.is_file())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=9) as tar:
        for p in files:
            rel = p.relative_to(site)
            if _keep(rel):
                tar.add(p, arcname=str(rel), recursive=False)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        out = make_payload(sys.argv[1])
    except OmniedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
