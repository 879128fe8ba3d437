"""`omniedge info`: what a checkpoint or an engine bundle holds (no torch), and whether it is damaged: a bundle
gets the checks `omniedge run` makes plus every checksum; a checkpoint the checks `export` makes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omniedge.checkpoint import check_checkpoint_dir, read_meta
from omniedge.errors import OmniedgeError
from omniedge.runtime.manifest import Manifest


def _size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def describe_checkpoint(path: Path) -> list[str]:
    """What `check_checkpoint_dir` accepted, described; odd shapes inside config.json are clear errors."""
    try:
        return _describe_checkpoint(path)
    except (AttributeError, TypeError, ValueError) as e:
        raise OmniedgeError(
            f"{path}: config.json or omniedge.json has an unexpected structure ({e})",
            "re-create the checkpoint with `omniedge compress` or `save_pretrained`",
        ) from e


def _describe_checkpoint(path: Path) -> list[str]:
    cfg = json.loads((path / "config.json").read_text())
    th = cfg.get("thinker_config", {})
    tc = th.get("text_config", {})
    per_layer = tc.get("omniedge_experts_per_layer")
    experts = f"{tc.get('num_experts')} experts" if not per_layer else f"{per_layer} experts per layer"
    lines = [
        f"checkpoint  {path}  ({_mib(_size(path))} on disk)",
        f"  thinker   {tc.get('num_hidden_layers')} layers, hidden {tc.get('hidden_size')}, "
        f"{experts} top-{tc.get('num_experts_per_tok')}, vocab {tc.get('vocab_size')}",
        f"  audio     {th.get('audio_config', {}).get('encoder_layers')} layers, "
        f"d_model {th.get('audio_config', {}).get('d_model')}",
        f"  vision    {th.get('vision_config', {}).get('depth')} layers, "
        f"hidden {th.get('vision_config', {}).get('hidden_size')}",
        f"  speech out {'yes (talker + code2wav)' if cfg.get('enable_audio_output') else 'no (thinker only)'}",
    ]
    q = cfg.get("omniedge_quantization")
    if q:
        lines.append(
            f"  quantized {q.get('method')} int{q.get('bits')} group {q.get('group_size')}"
            f"{'' if q.get('symmetric', True) else ' with zero points'}, "
            f"{len(q.get('modules', []))} tensors in {q.get('file')}"
        )
    meta = read_meta(path)
    if meta:
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
        d = meta.get("distill")
        if isinstance(d, dict) and d.get("run"):
            kept = ", ".join(f"{t} {100 * v:.1f}%" for t, v in (d.get("retention") or {}).items())
            lines.append(
                f"  distilled {d['run'].get('steps')} steps from {d.get('teacher', {}).get('path')} "
                f"(INT4: {d.get('int4', {}).get('mode')})" + (f"; retention {kept}" if kept else "")
            )
        run = meta.get("run")
        if run:
            gpu = run.get("gpu_peak_bytes")
            lines.append(
                f"  compress  {run.get('seconds', 0):.1f} s on {run.get('device')}, peak host RSS "
                f"{_mib(run.get('host_peak_rss_bytes', 0))}" + (f", peak GPU {_mib(gpu)}" if gpu else "")
            )
    return lines


def describe_bundle(m: Manifest) -> list[str]:
    raw: dict[str, Any] = m.raw
    b = raw.get("builder") if isinstance(raw.get("builder"), dict) else {}
    lines = [
        f"bundle  {m.root}  ({_mib(_size(m.root))} on disk), manifest schema {raw.get('schema_version')}",
        f"  model    {m.model_name}",
        f"  built    omniedge {b.get('omniedge')}, onnx opset {b.get('opset')}, TensorRT {b.get('tensorrt') or '-'}"
        + (f", GPU {b.get('gpu')} (sm_{b.get('gpu_sm')})" if b.get("gpu") else ""),
    ]
    for name, comp in m.components.items():
        files = [p.name for p in (comp.onnx, comp.engine) if p is not None]
        ins = ", ".join(f"{i.name}{list(i.shape)}" for i in comp.inputs[:4])
        more = " ..." if len(comp.inputs) > 4 else ""
        lines.append(f"  {name:<8} {' + '.join(files)}  weights {_mib(comp.weight_bytes)}  in: {ins}{more}")
    if m.image:
        lines.append(f"  image    {list(m.image.size)} px -> {m.image.num_tokens} tokens")
    return lines


def check_bundle_cli(path: Path, checksums: bool = True) -> list[str]:
    """The bundle's description and health, or one OmniedgeError listing every damage found."""
    from omniedge.runtime.bundle_check import check_bundle

    health = check_bundle(path, checksums=checksums)
    if health.fatal is not None:
        raise health.fatal
    lines = describe_bundle(health.manifest)
    if health.damage:
        print("\n".join(lines))
        raise OmniedgeError(
            f"bundle {path} is damaged:\n" + "\n".join(f"  - {d}" for d in health.damage),
            "copy the damaged files again from the machine that exported the bundle, or re-export it "
            "with `omniedge export CHECKPOINT -o BUNDLE`",
        )
    sums = f", {health.checked_files} checksums match" if checksums else ", checksums not checked"
    lines.append(f"  health   ok: the checks `omniedge run` makes pass{sums}")
    return lines


def info_cli(path: Path, checksums: bool = True) -> None:
    path = Path(path)
    if not path.exists():
        raise OmniedgeError(
            f"{path} does not exist", "pass a checkpoint directory or an engine bundle directory"
        )
    if (path / "manifest.json").is_file():
        lines = check_bundle_cli(path, checksums)
    elif (path / "config.json").is_file():
        lines = describe_checkpoint(check_checkpoint_dir(path))
    else:
        raise OmniedgeError(
            f"{path} is neither a checkpoint (config.json) nor an engine bundle (manifest.json)",
            "pass the output directory of `omniedge compress` or `omniedge export`",
        )
    print("\n".join(lines))
