"""Build libomniedge_moe_int4.so, the ONNX Runtime custom-op library of omniedge's fused INT4 MoE
(`ai.omniedge::MoEInt4`), for this machine.

    python3 kernels/moe_int4/build.py --ort-include DIR [-o FILE] [--cpu-only] [--arch 90 87] [--define NAME=VALUE]

With nvcc: the CUDA kernels (moe_int4_{decode,prefill,forward}.cu, one cubin per --arch: 90 = H100/H200, 87 = Jetson AGX Orin)
and the op for CUDAExecutionProvider (float16) and CPUExecutionProvider (float32, the reference loop).
`--cpu-only` (or no nvcc): the CPU op alone, with the host C++ compiler. DIR holds ONNX Runtime's
`onnxruntime_c_api.h` (API version 12 or later: any ONNX Runtime release since 1.12 ships it in its include
folder; the Python wheels do not). The default output is where the runtime looks:
$OMNIEDGE_OPS_DIR, else $OMNIEDGE_HOME/lib (omniedge/runtime/custom_ops.py). Written beside and renamed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY = "libomniedge_moe_int4.so"


def default_output() -> Path:
    """Where the runtime looks (omniedge/runtime/custom_ops.py; needs omniedge installed, as any checkout's)."""
    from omniedge.runtime.custom_ops import ops_dir

    return ops_dir() / LIBRARY


def command(
    ort_include: Path, out: Path, cuda: bool, arch: list[str], defines: tuple[str, ...] = ()
) -> list[str]:
    op = str(HERE / "moe_int4_op.cc")
    if cuda:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch]
        return ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-DOMNIEDGE_WITH_CUDA", *(f"-D{d}" for d in defines),
                f"-I{ort_include}", *gencode, "-o", str(out), op, *(str(HERE / f"moe_int4_{n}.cu") for n in ("decode", "prefill", "forward"))]  # fmt: skip
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{ort_include}", "-o", str(out), op]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ort-include", type=Path, required=True, help="folder with onnxruntime_c_api.h")
    p.add_argument("-o", "--out", type=Path, help=f"library file (default: {default_output()})")
    p.add_argument("--cpu-only", action="store_true", help="no CUDA kernels (no nvcc needed)")
    p.add_argument(
        "--arch", nargs="+", default=["90", "87"], help="CUDA compute capabilities (default 90 87)"
    )
    p.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a decode tuning macro (moe_int4_decode.cu), e.g. OMNIEDGE_MOE_WARPS=8",
    )
    args = p.parse_args(argv)
    for d in args.define:
        if not d.startswith("OMNIEDGE_MOE_") or "=" not in d or not d.split("=", 1)[1].isdigit():
            print(f"error: --define {d!r} is not a tuning macro\nfix: give NAME=VALUE with a name from "
                  "moe_int4_decode.cu's OMNIEDGE_MOE_* and a whole number", file=sys.stderr)  # fmt: skip
            return 2
    header = args.ort_include / "onnxruntime_c_api.h"
    if not header.is_file():
        print(f"error: {header} not found\nfix: pass --ort-include the include folder of an ONNX Runtime "
              "release (1.12 or later)", file=sys.stderr)  # fmt: skip
        return 2
    cuda = not args.cpu_only
    if cuda and shutil.which("nvcc") is None:
        print("error: nvcc not found\nfix: install the CUDA toolkit, or pass --cpu-only", file=sys.stderr)
        return 2
    out = args.out or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    rc = subprocess.run(command(args.ort_include, tmp, cuda, args.arch, tuple(args.define))).returncode
    if rc:
        tmp.unlink(missing_ok=True)
        print("error: the compiler failed (above)", file=sys.stderr)
        return rc
    tmp.replace(out)
    print(f"{out} ({'CUDA sm_' + ' sm_'.join(args.arch) + ' + ' if cuda else ''}CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
