"""omniedge's fused INT4 MoE kernels (kernels/moe_int4/) from Python on a CUDA GPU, for the probe and the GPU
tests: the nvcc build of the kernels alone (no ONNX Runtime), a ctypes binding of their entry point on torch's
stream, random layers in the exporter's layout, and the float32 reference they are checked against.
"""

from __future__ import annotations

import ctypes
import math
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "kernels" / "moe_int4" / f"moe_int4_{n}.cu" for n in ("decode", "prefill", "forward")]
SHAPE = {"E": 64, "k": 8, "H": 2048, "I": 768, "group": 128}  # the thinker at 64 of 128 experts


def build(out_dir: Path, defines: tuple[str, ...] = (), arch: tuple[str, ...] = ("90", "87")) -> Path:
    tag = "-".join(d.replace("OMNIEDGE_MOE_", "").replace("=", "") for d in defines) or "defaults"
    lib = out_dir / f"libomniedge_moe_int4_kernels-{tag}.so"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch]
    cmd = [
        "nvcc",
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        *gencode,
        *(f"-D{d}" for d in defines),
    ]
    subprocess.run([*cmd, "-o", str(lib), *map(str, SOURCES)], check=True)
    return lib


class FusedMoE:
    """ctypes binding of omniedge_moe_int4_forward (decode or prefill kernels by token count) on torch's
    current stream, with its scratch kept per shape."""

    def __init__(self, lib: Path) -> None:
        self.lib = ctypes.CDLL(str(lib))
        self.lib.omniedge_moe_int4_forward.restype = ctypes.c_int
        self.lib.omniedge_moe_int4_forward.argtypes = (
            [ctypes.c_void_p] * 8 + [ctypes.c_int] * 6 + [ctypes.c_void_p]
        )
        self.lib.omniedge_moe_int4_forward_scratch_bytes.restype = ctypes.c_size_t
        self.lib.omniedge_moe_int4_forward_scratch_bytes.argtypes = [ctypes.c_int] * 6
        self._scratch: dict[tuple[int, ...], torch.Tensor] = {}

    def scratch(self, *shape: int) -> torch.Tensor:
        if shape not in self._scratch:
            n = self.lib.omniedge_moe_int4_forward_scratch_bytes(*shape)
            self._scratch[shape] = torch.empty(n, dtype=torch.uint8, device="cuda")
        return self._scratch[shape]

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, w: dict[str, torch.Tensor], out: torch.Tensor,
                 k: int, group: int) -> None:  # fmt: skip
        m, h = x.shape
        e, two_i = w["fc1"].shape[:2]
        shape = (m, e, k, h, two_i // 2, group)
        rc = self.lib.omniedge_moe_int4_forward(
            x.data_ptr(), logits.data_ptr(), w["fc1"].data_ptr(), w["fc1_scales"].data_ptr(),
            w["fc2"].data_ptr(), w["fc2_scales"].data_ptr(), out.data_ptr(), self.scratch(*shape).data_ptr(),
            *shape, torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
        if rc:
            raise RuntimeError(f"omniedge_moe_int4_forward returned {rc}")


def random_layer(e: int, h: int, inter: int, group: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """QMoE's tensors: fc1 [E, 2I, H/2] (gate j, up j interleaved), fc2 [E, H, I/2], float16 scales."""

    def codes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda", generator=gen)

    def scales(*shape: int) -> torch.Tensor:
        fan_in = shape[-1] * group
        return (torch.rand(shape, device="cuda", generator=gen) + 0.5).div(4 * math.sqrt(fan_in)).half()

    return {
        "fc1": codes(e, 2 * inter, h // 2),
        "fc1_scales": scales(e, 2 * inter, h // group),
        "fc2": codes(e, h, inter // 2),
        "fc2_scales": scales(e, h, inter // group),
    }


def reference(
    x: torch.Tensor, logits: torch.Tensor, w: dict[str, torch.Tensor], k: int, group: int
) -> torch.Tensor:
    """float32: omniedge.int4.dequantize of the chosen experts; top-k logits, softmax over them; SwiGLU."""
    from omniedge.int4 import dequantize

    def weight(packed: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        n, half_k = packed.shape
        return dequantize(packed.view(n, -1, group // 2), sc.float(), 2 * half_k)

    top, ids = logits.float().topk(k, dim=-1)
    gates = top.softmax(dim=-1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for m in range(x.shape[0]):
        for s in range(k):
            e = int(ids[m, s])
            gu = weight(w["fc1"][e], w["fc1_scales"][e]) @ x[m].float()
            act = torch.nn.functional.silu(gu[0::2]) * gu[1::2]
            out[m] += gates[m, s] * (weight(w["fc2"][e], w["fc2_scales"][e]) @ act)
    return out


def check(fused: FusedMoE, cases: list[tuple[dict[str, int], tuple[int, ...]]], gen: torch.Generator) -> list[dict[str, Any]]:  # fmt: skip
    """Each shape at each token count against the float32 reference (from 16 tokens the prefill kernels)."""
    rows = []
    for sh, counts in cases:
        w = random_layer(sh["E"], sh["H"], sh["I"], sh["group"], gen)
        for m in counts:
            x = torch.randn(m, sh["H"], device="cuda", generator=gen).half()
            logits = torch.randn(m, sh["E"], device="cuda", generator=gen).half()
            out = torch.empty_like(x)
            fused(x, logits, w, out, sh["k"], sh["group"])
            ref = reference(x, logits, w, sh["k"], sh["group"])
            err = float((out.float() - ref).abs().max() / ref.abs().max())
            rows.append({**sh, "M": m, "max_error_over_max": err, "ok": err < 5e-3})
            print(f"check {sh} M={m}: max error / max {err:.2e}", flush=True)
    return rows


def check_nan_logits(fused: FusedMoE, sh: dict[str, int], counts: tuple[int, ...], gen: torch.Generator) -> list[dict[str, Any]]:  # fmt: skip
    """NaN router logits (a NaN hidden state upstream) rank as -inf: token 0's logits all NaN (its experts:
    the first k, equal weights), token 1's first five NaN; the kernels must neither fault nor pick twice."""
    w = random_layer(sh["E"], sh["H"], sh["I"], sh["group"], gen)
    rows = []
    for m in counts:
        x = torch.randn(m, sh["H"], device="cuda", generator=gen).half()
        logits = torch.randn(m, sh["E"], device="cuda", generator=gen).half()
        logits[0] = float("nan")
        logits[1, :5] = float("nan")
        ref_logits = logits.float().nan_to_num(nan=float("-inf"))
        ref_logits[0] = float("-inf")
        ref_logits[0, : sh["k"]] = 0.0
        out = torch.empty_like(x)
        fused(x, logits, w, out, sh["k"], sh["group"])
        ref = reference(x, ref_logits, w, sh["k"], sh["group"])
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        rows.append({**sh, "M": m, "nan_logits": True, "max_error_over_max": err, "ok": err < 5e-3})
        print(f"check NaN logits M={m}: max error / max {err:.2e}", flush=True)
    return rows
