"""`omniedge build`: TensorRT engines from a bundle's ONNX graphs, on the GPU that will run them.

Engines are specific to the GPU and TensorRT version that built them, so this runs on the Jetson (in
the L4T container), never on the export host. Needs only tensorrt (+ cuda-python to name the GPU), no
torch. Dynamic dims get optimisation profiles derived from the manifest (audio length, context size);
the thinker gets two: "prefill" (long seq, empty cache) and "decode" (seq 1, long cache). TensorRT
builds are one opaque call per engine, so progress is a line per engine (no tqdm needed on the device).

TensorRT cannot parse onnxruntime's com.microsoft ops, so INT4 graphs (MatMulNBits) are reported and
skipped; an INT4 TensorRT flavour with blocked DequantizeLinear is a later step.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

from omniedge.atomic import atomic_write_bytes, atomic_write_json
from omniedge.checkpoint import file_sha256
from omniedge.errors import OmniedgeError

MANIFEST = "manifest.json"
DEFAULT_CONTEXT = 4096  # tokens of KV cache an engine is built for (capped by max_position_embeddings)
PREFILL_OPT = 512
_NO_TRT_FIX = (
    "run `omniedge build` on the Jetson inside the L4T container (docker build -f Dockerfile.l4t ...; "
    "JetPack 6 ships TensorRT 10.3), or on an x86 host with CUDA: pip install 'omniedge[trt]'"
)

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or an OmniedgeError that says how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise OmniedgeError("TensorRT is not installed (no `tensorrt` Python package)", _NO_TRT_FIX) from e
    return tensorrt


def read_manifest(bundle: Path) -> dict[str, Any]:
    f = Path(bundle) / MANIFEST
    if not f.is_file():
        raise OmniedgeError(
            f"{bundle} is not an engine bundle: it has no {MANIFEST}",
            "pass the directory written by `omniedge export`",
        )
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise OmniedgeError(
            f"{f} is not valid JSON ({e})", "re-export the bundle with `omniedge export`"
        ) from e
    if m.get("schema_version") != 1 or not isinstance(m.get("components"), dict):
        raise OmniedgeError(
            f"{f} is not a schema_version 1 manifest", "re-export the bundle with `omniedge export`"
        )
    return m


def dim_ranges(
    manifest: dict[str, Any], max_context: int = DEFAULT_CONTEXT
) -> dict[str, dict[str, tuple[int, ...]]]:
    """(min, opt, max) of every symbolic input dim, per profile name, from the manifest's preprocessing
    and text settings: audio up to max_seconds, thinker up to `max_context` tokens."""
    pre = manifest.get("preprocess", {})
    audio = pre.get("audio") or {}
    frames = int(audio.get("chunk_frames", 2 * int(audio.get("n_window", 50))))
    per_chunk = int(audio.get("tokens_per_chunk", 13))
    fps = int(audio.get("sampling_rate", 16000)) // int(audio.get("hop_length", 160))
    chunks = max(1, math.ceil(float(audio.get("max_seconds", 30)) * fps / frames))
    opt_chunks = min(chunks, 4)
    text = manifest.get("text", {})
    ctx = min(int(text.get("max_position_embeddings", max_context)), max_context)
    shared = {
        "num_chunks": (1, opt_chunks, chunks),
        "chunk_frames": (1, frames, frames),
        "num_tokens": (1, opt_chunks * per_chunk, chunks * per_chunk),
    }
    return {
        "default": shared,
        "prefill": {**shared, "seq": (1, min(PREFILL_OPT, ctx), ctx), "past": (0, 0, ctx - 1)},
        "decode": {**shared, "seq": (1, 1, 1), "past": (0, ctx // 2, ctx - 1)},
    }


def profiles_for(
    component: dict[str, Any], ranges: dict[str, dict[str, tuple[int, ...]]]
) -> dict[str, Profile]:
    """Optimisation profiles for one component; {} when all its inputs are static."""
    inputs = component.get("inputs", [])
    dims = {d for i in inputs for d in i["shape"] if isinstance(d, str)}
    if not dims:
        return {}
    names = ["prefill", "decode"] if {"seq", "past"} & dims else ["default"]
    out: dict[str, Profile] = {}
    for pname in names:
        r = ranges[pname]
        unknown = dims - set(r)
        if unknown:
            raise OmniedgeError(
                f"the manifest uses dims {sorted(unknown)} that omniedge build has no range for",
                "re-export the bundle with the same omniedge version as this build",
            )
        out[pname] = {
            i["name"]: tuple(
                tuple(r[d][k] if isinstance(d, str) else int(d) for d in i["shape"]) for k in range(3)
            )  # type: ignore[misc]
            for i in inputs
        }
    return out


def contrib_ops(onnx_path: Path) -> list[str]:
    """Ops of non-standard domains (com.microsoft...) in a graph; [] when onnx is not installed."""
    try:
        import onnx
    except ImportError:
        return []
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    return sorted({f"{n.domain}.{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx")})


def build_engine(trt: ModuleType, onnx_path: Path, profiles: dict[str, Profile], fp16: bool = True) -> bytes:
    """Parse `onnx_path` and build a serialized engine (fp16 where the TensorRT flavour has the flag)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise OmniedgeError(
            f"TensorRT could not parse {onnx_path.name}: {'; '.join(errors[:3])}",
            "re-export with this omniedge version; if it persists, report the TensorRT version in a bug",
        )
    config = builder.create_builder_config()
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    for shapes in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise OmniedgeError(
            f"TensorRT failed to build an engine from {onnx_path.name}",
            "see the TensorRT log above; free GPU memory or lower the context size",
        )
    return bytes(memoryview(engine))


def gpu_info() -> tuple[str | None, int | None]:
    """(GPU name, SM as 87 for 8.7) from cuda-python, else nvidia-smi; (None, None) without a GPU."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return name.strip("\x00 "), int(props.major) * 10 + int(props.minor)
    except Exception:  # no cuda-python, no driver, or no device: try the next source
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.splitlines()[0]
        name, cap = (s.strip() for s in out.split(","))
        return name, round(float(cap) * 10)
    except Exception:  # no nvidia-smi (Jetson), or no GPU
        return None, None


def build_bundle(
    bundle: Path, trt: ModuleType | None = None, max_context: int = DEFAULT_CONTEXT
) -> dict[str, str]:
    """Build an engine for every component TensorRT can parse; update the manifest. Returns, per
    component, "built" or the reason it was skipped. `trt` defaults to the `tensorrt` package."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    trt = trt or import_tensorrt()
    ranges = dim_ranges(manifest, max_context)
    result: dict[str, str] = {}
    for name, comp in manifest["components"].items():
        print(f"build {name}: parsing and optimising (minutes at full size) ...", flush=True)
        onnx_file = comp.get("onnx")
        if not onnx_file or not (bundle / onnx_file).is_file():
            result[name] = "skipped: no ONNX file"
            continue
        contrib = contrib_ops(bundle / onnx_file)
        if contrib:
            result[name] = (
                f"skipped: uses {', '.join(contrib)}, which TensorRT cannot parse "
                "(INT4 for TensorRT via blocked DequantizeLinear is a later step; ORT runs this graph)"
            )
            comp["engine_skipped"] = result[name]
            continue
        profiles = profiles_for(comp, ranges)
        engine = build_engine(trt, bundle / onnx_file, profiles)
        engine_file = f"{name}.engine"
        atomic_write_bytes(bundle / engine_file, engine)
        comp["engine"] = engine_file
        comp["engine_profiles"] = [
            {"name": p, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}
            for p, shapes in profiles.items()
        ]
        comp.setdefault("sha256", {})[engine_file] = file_sha256(bundle / engine_file)
        comp.pop("engine_skipped", None)
        result[name] = "built"
        print(f"  {engine_file}  {len(engine) / 2**20:.1f} MiB", flush=True)
    gpu, sm = gpu_info()
    manifest["builder"] = {
        **manifest.get("builder", {}),
        "tensorrt": getattr(trt, "__version__", None),
        "tensorrt_package": trt.__name__,
        "gpu": gpu,
        "gpu_sm": sm,
        "max_context": min(
            int(manifest.get("text", {}).get("max_position_embeddings", max_context)), max_context
        ),
    }
    atomic_write_json(bundle / MANIFEST, manifest)
    return result


def build_cli(bundle: Path) -> None:
    """What `omniedge build` runs: engines for every graph TensorRT can take, and a summary."""
    result = build_bundle(Path(bundle))
    for name, status in result.items():
        print(f"{name:<8} {status}")
    if not any(s == "built" for s in result.values()):
        raise OmniedgeError(
            f"no engine was built for {bundle}",
            "export without INT4 (`omniedge compress --no-quantize`) to get TensorRT engines today",
        )
