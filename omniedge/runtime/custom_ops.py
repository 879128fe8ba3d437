"""Custom-op libraries a bundle's graphs need (manifest `thinker_graph.custom_ops`): where the runtime finds
each built library, and a clear error when it is not there. Libraries are built per machine from kernels/
(kernels/moe_int4/README.md): a bundle does not carry them, so one bundle serves an H200 and an Orin.

A library named N is `libN.so` in $OMNIEDGE_OPS_DIR, else in $OMNIEDGE_HOME/lib (where kernels/moe_int4/build.py
writes by default)."""

from __future__ import annotations

import os
from pathlib import Path

from omniedge.errors import OmniedgeError
from omniedge.paths import home

KNOWN = {"omniedge_moe_int4": "kernels/moe_int4"}  # library name -> its sources in the repository


def ops_dir() -> Path:
    env = os.environ.get("OMNIEDGE_OPS_DIR")
    return Path(env) if env else home() / "lib"


def library_paths(names: tuple[str, ...] | list[str]) -> list[Path]:
    """The library file of each name, checked to exist (one error naming the first that does not)."""
    paths = []
    for name in names:
        if name not in KNOWN:
            raise OmniedgeError(
                f"the bundle needs a custom-op library this runtime does not know: {name!r}",
                "update omniedge, or re-export the bundle with this version",
            )
        path = ops_dir() / f"lib{name}.so"
        if not path.is_file():
            raise OmniedgeError(
                f"the bundle's thinker needs the custom-op library {name}, not found at {path}",
                f"build it from an omniedge checkout: python3 {KNOWN[name]}/build.py --ort-include DIR (DIR: the "
                "include folder of an ONNX Runtime release); or set OMNIEDGE_OPS_DIR to where it is; or re-export "
                "the bundle with --moe-kernel qmoe",
            )
        paths.append(path)
    return paths
