"""Where a long prompt's GPU memory goes: the thinker's prefill workspaces, op by op and as a whole.

`python -m omniedge.bench.prefill_memory BUNDLE --tokens 4096 --json OUT`

- ops: the first node of each heavy op type of the bundle's thinker graph (attention, the MoE, the INT4
  linears, the router, the fused norm), each alone in its own session with the runtime's settings, its inputs
  and outputs allocated by this script before measuring: what the op's run adds to this process's GPU memory
  at `--tokens` tokens (after one short run, which pays one-time costs such as library handles) is the
  workspace the op itself asks its execution provider's arena for. Weights are the bundle's own (the node's
  initializers, read from its external data).
- curve: the whole thinker as the runtime loads it (without its warm-up), memory after prompts of growing
  length, then a repeat of the longest (does the arena reuse what it has?), then shorter prompts of new lengths
  (does each new shape add?), then decode steps (the captured CUDA graph).
Memory is this process's own, from NVML (`nvmlDeviceGetComputeRunningProcesses`), so another process on the
same GPU does not change it; where NVML does not list the process the figures are None, never guessed.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MIB = 2**20
OP_TYPES = ("GroupQueryAttention", "QMoE", "MoE", "MatMulNBits", "MatMul", "SkipSimplifiedLayerNormalization")
_NP_OF_ONNX = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64}


def process_gpu_bytes(pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to this process (CUDA context included), or None where it cannot tell."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        me = os.getpid() if pid is None else pid
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == me and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None  # not listed: no CUDA context yet, or NVML sees other process ids (a container)
    except Exception:
        return None


def _mib(after: int | None, before: int | None) -> float | None:
    return None if after is None or before is None else round((after - before) / MIB, 1)


# ------------------------------------------------------------------ single-op models


def heavy_nodes(model: Any) -> list[Any]:
    """The first node of each op type worth measuring (both MatMulNBits of a layer: q/k/v and o_proj)."""
    picked: list[Any] = []
    seen: dict[str, int] = {}
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        t = node.op_type
        if t not in OP_TYPES or seen.get(t, 0) >= (2 if t == "MatMulNBits" else 1):
            continue
        if t == "MatMul" and (len(node.input) < 2 or node.input[1] not in inits):
            continue  # a router: activations times a weight
        seen[t] = seen.get(t, 0) + 1
        picked.append(node)
    return picked


def single_node_model(model: Any, node: Any, dtype: int) -> Any:
    """A model of `node` alone: its initializers (external data references kept), other inputs as graph
    inputs; the fused norm's optional mean / inverse-std outputs dropped."""
    import onnx
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    n = onnx.NodeProto()
    n.CopyFrom(node)
    if n.op_type == "SkipSimplifiedLayerNormalization":
        for j in (1, 2):
            if j < len(n.output):
                n.output[j] = ""
    ins, used = [], []
    for name in n.input:
        if not name:
            continue
        if name in inits:
            used.append(inits[name])
        elif name not in {i.name for i in ins}:
            ins.append(helper.make_tensor_value_info(name, graph_inputs.get(name, dtype), None))
    outs = [helper.make_tensor_value_info(o, dtype, None) for o in n.output if o]
    g = helper.make_graph([n], f"probe_{n.op_type}", ins, outs, initializer=used)
    return helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def feeds(
    node: Any, tokens: int, hidden: int, head_dim: int, dt: Any, dims: dict[str, list[int]]
) -> tuple[dict[str, np.ndarray], dict]:
    """(inputs, outputs) for `node` at `tokens` tokens: arrays to bind, and output name -> (shape, or the
    input name it shares its buffer with)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    act = lambda *s: (rng.standard_normal(s) * 0.1).astype(dt)  # noqa: E731
    t = node.op_type
    x: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {}
    if t == "GroupQueryAttention":
        nh, kvh = int(attrs["num_heads"]), int(attrs["kv_num_heads"])
        ctx = tokens + 8
        widths = [nh * head_dim, kvh * head_dim, kvh * head_dim]
        if node.input[1]:  # q, k, v apart
            for name, w in zip(node.input[:3], widths, strict=True):
                x[name] = act(1, tokens, w)
        else:
            x[node.input[0]] = act(1, tokens, sum(widths))
        past_k, past_v = node.input[3], node.input[4]
        x[past_k] = np.zeros((1, kvh, ctx, head_dim), dt)
        x[past_v] = np.zeros((1, kvh, ctx, head_dim), dt)
        x[node.input[5]] = np.array([tokens - 1], np.int32)
        x[node.input[6]] = np.array(tokens, np.int32)
        ang = rng.uniform(0, 3.1, (ctx, head_dim // 2))
        x[node.input[7]], x[node.input[8]] = np.cos(ang).astype(dt), np.sin(ang).astype(dt)
        x[node.input[9]] = np.arange(tokens, dtype=np.int64)[None]
        out = {node.output[0]: (1, tokens, nh * head_dim), node.output[1]: past_k, node.output[2]: past_v}
    elif t in ("QMoE", "MoE"):
        experts = dims[node.input[2]][0]
        x = {node.input[0]: act(tokens, hidden), node.input[1]: act(tokens, experts) * 10}
        out = {node.output[0]: (tokens, hidden)}
    elif t == "MatMulNBits":
        x = {node.input[0]: act(1, tokens, int(attrs["K"]))}
        out = {node.output[0]: (1, tokens, int(attrs["N"]))}
    elif t == "MatMul":
        n_out = dims[node.input[1]][1]
        x = {node.input[0]: act(tokens, hidden)}
        out = {node.output[0]: (tokens, n_out)}
    elif t == "SkipSimplifiedLayerNormalization":
        x = {node.input[0]: act(1, tokens, hidden), node.input[1]: act(1, tokens, hidden)}
        out = {o: (1, tokens, hidden) for j, o in enumerate(node.output) if o and j in (0, 3)}
    return x, out


def measure_op(path: Path, node: Any, shapes: dict[str, Any], tokens: int, device: str, ort: Any) -> dict:
    """One op alone: session cost, then the workspace its run at `tokens` adds (after a 16-token run)."""
    from omniedge.runtime import ort_cuda

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":  # the runtime's settings and arena policy (runtime/backends.py, runtime/ort_cuda.py)
        ort_cuda.apply(opts)
        providers = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    before = process_gpu_bytes() or 0
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    made = process_gpu_bytes()
    row: dict[str, Any] = {"op": node.op_type, "node": node.name, "session_mib": _mib(made, before)}

    def run(n: int) -> tuple[float, int | None, int | None]:
        arrays, outs = feeds(node, n, **shapes)
        vals = {k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in arrays.items()}
        io = sess.io_binding()
        for k, v in vals.items():
            io.bind_ortvalue_input(k, v)
        keep = []
        for k, spec in outs.items():
            if isinstance(spec, str):
                io.bind_ortvalue_output(k, vals[spec])
            else:
                o = ort.OrtValue.ortvalue_from_shape_and_type(list(spec), shapes["dt"], device, 0)
                keep.append(o)
                io.bind_ortvalue_output(k, o)
        pre = process_gpu_bytes()
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, pre, process_gpu_bytes()

    _, pre, post = run(16)
    row["first_run_mib"] = _mib(post, pre)
    ms, pre, post = run(tokens)
    row[f"workspace_at_{tokens}_mib"] = _mib(post, pre)
    row[f"ms_at_{tokens}"] = round(ms, 2)
    ms, pre, post = run(tokens)
    row["again_mib"] = _mib(post, pre)
    row[f"ms_at_{tokens}_again"] = round(ms, 2)
    return row  # the session goes with this frame; ops() collects before the next op


def ops(bundle: Path, tokens: int, device: str = "cuda") -> list[dict]:
    import onnx
    import onnxruntime as ort

    from omniedge.runtime.manifest import load_manifest

    m = load_manifest(bundle)
    path = Path(m.components["thinker"].onnx)
    model = onnx.load(str(path), load_external_data=False)
    dtype = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == "inputs_embeds")
    shapes = {
        "hidden": m.text.hidden_size,
        "head_dim": m.text.head_dim,
        "dt": _NP_OF_ONNX[dtype],
        "dims": {i.name: list(i.dims) for i in model.graph.initializer},
    }
    rows = []
    for node in heavy_nodes(model):
        probe = path.parent / f".probe-{node.op_type}-{len(rows)}.onnx"  # beside the weights it references
        onnx.save(single_node_model(model, node, dtype), str(probe))
        try:
            rows.append(measure_op(probe, node, shapes, tokens, device, ort))
        except Exception as e:  # one op's failure is a row, not the end of the probe
            rows.append({"op": node.op_type, "node": node.name, "error": str(e).splitlines()[0][:300]})
        finally:
            probe.unlink(missing_ok=True)
            gc.collect()
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------ the whole thinker


def curve(bundle: Path, lengths: list[int], revisit: list[int], steps: int, providers: str = "cuda") -> dict:
    from omniedge.runtime.backends import OrtBackend
    from omniedge.runtime.manifest import load_manifest
    from omniedge.runtime.thinker_ort import make_thinker

    m = load_manifest(bundle)
    comp = m.components["thinker"]
    start = process_gpu_bytes() or 0
    backend = OrtBackend(
        "thinker", comp.onnx, providers=providers, cuda_graph=True, custom_ops=m.thinker.custom_ops
    )
    backend.load()
    loaded = process_gpu_bytes()
    ctx = max(lengths + revisit) + steps + 8
    runner = make_thinker(m, backend, ctx, warm_up=False)
    h = m.text.hidden_size
    out: dict[str, Any] = {
        "weights_mib": round(comp.weight_bytes / MIB, 3),
        "kv_cache_mib": round(runner.kv_bytes / MIB, 3),
        "max_context": ctx,
        "load_mib": _mib(loaded, start),
        "after_buffers_mib": _mib(process_gpu_bytes(), start),
        "prefills": [],
    }
    for n in [*lengths, *revisit]:
        t0 = time.perf_counter()
        runner.prefill(np.zeros((1, n, h), runner.dtype), np.broadcast_to(np.arange(n), (3, n)), None)
        ms = (time.perf_counter() - t0) * 1e3
        out["prefills"].append(
            {"tokens": n, "ms": round(ms, 1), "process_mib": _mib(process_gpu_bytes(), start)}
        )
        print(out["prefills"][-1], flush=True)
    row = np.zeros(h, runner.dtype)
    for _ in range(steps):
        runner.decode(row, runner.cache_len)
    out["after_decode_mib"] = _mib(process_gpu_bytes(), start)
    out["overhead_over_weights_plus_kv"] = (
        None
        if out["after_decode_mib"] is None
        else round(out["after_decode_mib"] / (out["weights_mib"] + out["kv_cache_mib"]) - 1, 4)
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length for the op-by-op part")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--revisit", type=int, nargs="*", default=[4096, 3000, 1000, 700])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--parts", nargs="+", choices=["ops", "curve"], default=["ops", "curve"])
    p.add_argument("--providers", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    from omniedge.atomic import atomic_write_json
    from omniedge.bench.system import machine

    r: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine(), "tokens": a.tokens}
    if "ops" in a.parts:
        r["ops"] = ops(a.bundle, a.tokens, a.providers)
        atomic_write_json(a.json, r)
    if "curve" in a.parts:
        r["curve"] = curve(a.bundle, a.lengths, a.revisit, a.steps, a.providers)
    atomic_write_json(a.json, r)


if __name__ == "__main__":
    main()
