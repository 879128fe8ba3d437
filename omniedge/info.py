"""`omniedge info`: what a checkpoint or an engine bundle holds, read from its JSON files alone (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniedge.errors import OmniedgeError


def _size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def describe_checkpoint(path: Path) -> list[str]:
    cfg = json.loads((path / "config.json").read_text())
    th = cfg.get("thinker_config", {})
    tc = th.get("text_config", {})
    lines = [
        f"checkpoint  {path}  ({_mib(_size(path))} on disk)",
        f"  thinker   {tc.get('num_hidden_layers')} layers, hidden {tc.get('hidden_size')}, "
        f"{tc.get('num_experts')} experts top-{tc.get('num_experts_per_tok')}, vocab {tc.get('vocab_size')}",
        f"  audio     {th.get('audio_config', {}).get('encoder_layers')} layers, "
        f"d_model {th.get('audio_config', {}).get('d_model')}",
        f"  vision    {th.get('vision_config', {}).get('depth')} layers, "
        f"hidden {th.get('vision_config', {}).get('hidden_size')}",
        f"  speech out {'yes (talker + code2wav)' if cfg.get('enable_audio_output') else 'no (thinker only)'}",
    ]
    q = cfg.get("omniedge_quantization")
    if q:
        lines.append(
            f"  quantized {q.get('method')} int{q.get('bits')} group {q.get('group_size')}, "
            f"{len(q.get('modules', []))} tensors in {q.get('file')}"
        )
    meta_file = path / "omniedge.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        lines.append(f"  made by   {meta.get('made_by') or meta.get('model')}")
        for st in meta.get("stages", []):
            mes = st.get("measured") or {}
            measured = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in mes.items()
                if not isinstance(v, dict)
            )
            by = mes.get("by_modality") or {}
            if by:
                measured += "; KL " + ", ".join(f"{m} {v['kl']:.4g}" for m, v in by.items())
            lines.append(f"  stage     {st.get('name')}: {measured}")
        run = meta.get("run")
        if run:
            gpu = run.get("gpu_peak_bytes")
            lines.append(
                f"  compress  {run.get('seconds', 0):.1f} s on {run.get('device')}, peak host RSS "
                f"{_mib(run.get('host_peak_rss_bytes', 0))}" + (f", peak GPU {_mib(gpu)}" if gpu else "")
            )
    return lines


def describe_bundle(path: Path) -> list[str]:
    m: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    b = m.get("builder", {})
    lines = [
        f"bundle  {path}  ({_mib(_size(path))} on disk), manifest schema {m.get('schema_version')}",
        f"  model    {m.get('model', {}).get('name')}",
        f"  built    omniedge {b.get('omniedge')}, onnx opset {b.get('opset')}, TensorRT {b.get('tensorrt') or '-'}"
        + (f", GPU {b.get('gpu')} (sm_{b.get('gpu_sm')})" if b.get("gpu") else ""),
    ]
    for name, comp in m.get("components", {}).items():
        files = [comp.get("onnx"), comp.get("engine")]
        ins = ", ".join(f"{i['name']}{list(i['shape'])}" for i in comp.get("inputs", [])[:4])
        more = " ..." if len(comp.get("inputs", [])) > 4 else ""
        lines.append(
            f"  {name:<8} {' + '.join(f for f in files if f)}  weights {_mib(comp.get('weight_bytes', 0))}  in: {ins}{more}"
        )
    img = m.get("preprocess", {}).get("image")
    if img:
        lines.append(f"  image    {img.get('size')} px -> {img.get('num_tokens')} tokens")
    return lines


def info_cli(path: Path) -> None:
    path = Path(path)
    if not path.exists():
        raise OmniedgeError(
            f"{path} does not exist", "pass a checkpoint directory or an engine bundle directory"
        )
    if (path / "manifest.json").is_file():
        lines = describe_bundle(path)
    elif (path / "config.json").is_file():
        lines = describe_checkpoint(path)
    else:
        raise OmniedgeError(
            f"{path} is neither a checkpoint (config.json) nor an engine bundle (manifest.json)",
            "pass the output directory of `omniedge compress` or `omniedge export`",
        )
    print("\n".join(lines))
