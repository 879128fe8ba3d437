"""Engine backends behind one small interface, so the scheduler and generator never care what runs a graph.

`OrtBackend` runs an ONNX file with onnxruntime (CPU by default; CUDA or TensorRT execution providers
when the installed onnxruntime has them). A native TensorRT backend plugs into the same protocol later.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from omniedge.errors import OmniedgeError

# Short names a user can type, and the order "auto" tries them in.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


@runtime_checkable
class EngineBackend(Protocol):
    """What every engine offers: load/unload on demand, report its memory, run numpy in -> numpy out."""

    name: str

    @property
    def loaded(self) -> bool: ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def footprint_bytes(self) -> int: ...

    def input_names(self) -> list[str]: ...

    def output_names(self) -> list[str]: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def import_ort() -> Any:
    """onnxruntime, or an error that says which package to install for this machine."""
    try:
        import onnxruntime
    except ImportError as e:
        raise OmniedgeError(
            "onnxruntime is not installed: the runtime needs it to run the bundle's ONNX graphs",
            "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA); on a Jetson use the wheel for your JetPack",
        ) from e
    return onnxruntime


def resolve_providers(requested: str | Sequence[str] | None) -> list[str]:
    """Execution providers for a request: None -> CPU, "auto" -> the best available, else checked names."""
    ort = import_ort()
    available = list(ort.get_available_providers())
    if requested is None:
        return ["CPUExecutionProvider"]
    if isinstance(requested, str):
        if requested == "auto":
            return [p for p in AUTO_ORDER if p in available] or available[:1]
        requested = [s.strip() for s in requested.split(",") if s.strip()]
    out: list[str] = []
    for r in requested:
        full = PROVIDER_ALIASES.get(r.lower(), r)
        if full not in available:
            raise OmniedgeError(
                f"execution provider {r!r} is not available in this onnxruntime (has: {', '.join(available)})",
                "install onnxruntime-gpu for CUDA/TensorRT, or use the CPU (omit --providers; providers=None in Python)",
            )
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # fallback for ops an accelerator lacks
    return out


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # psutil is a base dependency, but a bare env should still run
        return 0


def _weight_files(onnx_path: Path) -> list[Path]:
    """The graph and its external-data files (same stem), which is what loading reads into memory."""
    files = [onnx_path]
    files += sorted(p for p in onnx_path.parent.glob(onnx_path.name + "*.data") if p != onnx_path)
    files += sorted(onnx_path.parent.glob(onnx_path.stem + ".onnx_data"))
    return files


class OrtBackend:
    """One ONNX graph in an onnxruntime InferenceSession."""

    def __init__(
        self,
        name: str,
        onnx_path: str | Path,
        providers: str | Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        cuda_graph: bool = False,
        profile_prefix: str | None = None,
        cpu_arena: bool = True,
        custom_ops: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.custom_ops = tuple(custom_ops)  # custom-op library names the graph needs (runtime/custom_ops.py)
        self.path = Path(onnx_path)
        self.providers = resolve_providers(providers)
        self.intra_op_threads = intra_op_threads
        # CUDA graphs: ONNX Runtime captures a run once and replays it (the thinker's decode step).
        self.cuda_graph = cuda_graph and "CUDAExecutionProvider" in self.providers
        self.profile_prefix = profile_prefix  # ONNX Runtime's per-node profiler writes <prefix>_<date>.json
        # ONNX Runtime's CPU arena keeps what a long request grew it by, forever; off, memory returns to the
        # system after each run (measured: no decode slowdown on omni-mini), which a memory budget needs.
        self.cpu_arena = cpu_arena
        self._session: Any = None
        self._inputs: dict[str, tuple[Any, type]] = {}
        self.cuda_settings: dict[str, str] = {}  # what a CUDA session was made with (runtime/ort_cuda.py)
        self._thinkers_made = 0  # per session: see next_thinker
        self._warmed_context = 0
        self.load_seconds = 0.0
        self.load_rss_bytes = 0
        self.file_bytes = sum(p.stat().st_size for p in _weight_files(self.path) if p.is_file())

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        if self._session is not None:
            return
        ort = import_ort()
        if not self.path.is_file():
            raise OmniedgeError(f"engine file missing: {self.path}", "copy the whole bundle directory again")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        opts.enable_cpu_mem_arena = self.cpu_arena
        if self.custom_ops:
            from omniedge.runtime.custom_ops import library_paths

            for lib in library_paths(self.custom_ops):
                opts.register_custom_ops_library(str(lib))
        if "CUDAExecutionProvider" in self.providers:
            from omniedge.runtime import ort_cuda

            self.cuda_settings = ort_cuda.apply(opts)
        if self.profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = self.profile_prefix
        before, t0 = _rss(), time.perf_counter()
        providers: list[Any] = [(p, self._provider_options(p)) for p in self.providers]
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise OmniedgeError(
                f"onnxruntime could not load {self.path.name} ({self.name}): {str(e).splitlines()[0]}",
                "re-export the bundle; if it was exported by a newer onnx, upgrade onnxruntime",
            ) from e
        self.load_seconds = time.perf_counter() - t0
        self.load_rss_bytes = max(0, _rss() - before)
        self._inputs = {
            i.name: (i.shape, _ORT_DTYPES.get(i.type, np.float32)) for i in self._session.get_inputs()
        }

    def _provider_options(self, provider: str) -> dict[str, str]:
        if provider != "CUDAExecutionProvider":
            return {}
        # Grow the device arena by what is asked, not to the next power of two: memory stays near what the
        # graph needs, which a shared-memory Jetson cannot spare.
        from omniedge.runtime import ort_cuda

        opts = {"arena_extend_strategy": "kSameAsRequested"}
        if self.cuda_graph:
            opts["enable_cuda_graph"] = "1"
        return ort_cuda.provider_options(opts)

    def end_profiling(self) -> str | None:
        """Stop ONNX Runtime's profiler (if on) and return the JSON file it wrote."""
        if self._session is None or not self.profile_prefix:
            return None
        return str(self._session.end_profiling())

    def unload(self) -> None:
        self._session = None
        self._thinkers_made = self._warmed_context = 0  # a new session captures and warms up afresh

    def next_thinker(self, max_context: int) -> tuple[int, bool]:
        """For a thinker runner about to be made on this session (thinker_ort.make_thinker): its CUDA-graph
        id (graph ids are session-wide and a new runner binds other buffers, so each gets its own) and
        whether it must warm up (once per session and context on a GPU: the arena and the kernel tactics a
        warm-up settles stay with the session)."""
        self._thinkers_made += 1
        warm = self.device != "cpu" and max_context > self._warmed_context
        if warm:
            self._warmed_context = max_context
        return self._thinkers_made, warm

    def footprint_bytes(self) -> int:
        """Bytes this engine holds while loaded: measured RSS growth at load, at least its weight files."""
        return max(self.file_bytes, self.load_rss_bytes) if self.loaded else 0

    def _require(self) -> Any:
        if self._session is None:
            self.load()
        return self._session

    def input_names(self) -> list[str]:
        return [i.name for i in self._require().get_inputs()]

    def output_names(self) -> list[str]:
        return [o.name for o in self._require().get_outputs()]

    def active_providers(self) -> list[str]:
        return list(self._require().get_providers())

    @property
    def session(self) -> Any:
        """The onnxruntime InferenceSession (loaded on first use), for IO binding."""
        return self._require()

    @property
    def device(self) -> str:
        """Where this engine's inputs and outputs live: "cuda" when a GPU provider runs it, else "cpu"."""
        gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
        return "cuda" if any(p in gpu for p in self.providers) else "cpu"

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self._require()
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise OmniedgeError(
                f"{self.name} graph needs inputs {missing} that the runtime did not give",
                "the bundle does not match this runtime's graph contract (docs/artifacts.md): re-export it",
            )
        feeds = {n: np.ascontiguousarray(inputs[n], dtype=dt) for n, (_, dt) in self._inputs.items()}
        try:
            outs = sess.run(None, feeds)
        except Exception as e:
            shapes = {n: tuple(a.shape) for n, a in feeds.items()}
            raise OmniedgeError(
                f"{self.name} graph failed on inputs {shapes}: {str(e).splitlines()[0]}",
                "check that the bundle matches this runtime (re-export it) and that inputs fit the manifest",
            ) from e
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}
