"""The one entry point of the compression stage: source + recipe -> compressed checkpoint, layer by layer.

The source is a checkpoint directory read tensor by tensor (weights.SafetensorsDir) or a seeded random
source of the real config (`full`). The embeddings and encoders turn the calibration and held-out requests
into layer 0's inputs; then omniedge.compress.layerwise runs one decoder layer at a time on the device
(statistics, prune, quantize, write); the final norm and lm_head score the held-out streams per modality.
The bf16 model is never held whole. Output goes to a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omniedge.atomic import atomic_dir, atomic_write_json
from omniedge.checkpoint import META_FILE, content_hashes, file_sha256, read_meta
from omniedge.errors import OmniedgeError
from omniedge.outputs import CHECKPOINT, check_replaceable

STATS_FILE = "calibration_stats.pt"
SMALL_FILE = 64 << 20  # input files below this are content-hashed; larger shards are recorded by size


class Meter:
    """Wall time and peak GPU memory per phase, and the process's peak host RSS."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.phases: dict[str, dict[str, float]] = {}
        self.gpu_peak = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
        rec: dict[str, float] = {"seconds": round(time.perf_counter() - t, 3)}
        if self.cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            rec["gpu_peak_bytes"] = peak
            self.gpu_peak = max(self.gpu_peak, peak)
        self.phases[name] = rec

    def summary(self) -> dict[str, Any]:
        return {
            "phases": self.phases,
            "seconds": round(sum(p["seconds"] for p in self.phases.values()), 3),
            "gpu_peak_bytes": self.gpu_peak if self.cuda else None,
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


def _check_out(src: Path | None, out: Path) -> None:
    if src is not None and out.resolve() == src.resolve():
        raise OmniedgeError(f"the output {out} is the input checkpoint", "write to a new directory with -o")
    check_replaceable(out, CHECKPOINT)


def _hash_dir(src: Path) -> dict[str, str]:
    """Content hashes of the input: from its omniedge.json when it has them, else computed for files below
    SMALL_FILE; large shards are recorded by size (hashing 70 GB would take longer than compressing it)."""
    files = read_meta(src).get("files")
    if isinstance(files, dict) and files:
        return dict(files)
    out = {}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != META_FILE:
            size = f.stat().st_size
            out[f.name] = file_sha256(f) if size < SMALL_FILE else f"bytes:{size}"
    return out


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise OmniedgeError(f"recipe device {name!r} is not a torch device", "use auto, cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OmniedgeError(
            "recipe asks for device cuda but no CUDA GPU is visible", "use device: auto or cpu"
        )
    return dev


def _check_complete(sk: Any, source: Any, where: str) -> None:
    """Every tensor the thinker needs is in the source: one clear error before any long work."""
    from omniedge.random_source import on_disk_names

    have = set(source.names())
    fused = {n.rsplit(".", 1)[0] for n in have if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    missing = [
        n
        for n in on_disk_names(sk.model)
        if n not in have and not (".experts." in n and n.split(".experts.")[0] + ".experts" in fused)
    ]
    if missing:
        raise OmniedgeError(
            f"{where} lacks {len(missing)} tensor(s) a Qwen3-Omni thinker of its config needs: "
            + ", ".join(missing[:3])
            + (" ..." if len(missing) > 3 else ""),
            "copy every shard of the checkpoint (or check that it is Qwen3-Omni-30B-A3B)",
        )


def model_facts(text_config: Any) -> Any:
    from omniedge.compress.stages import ModelFacts

    layers = int(text_config.num_hidden_layers)
    only = set(getattr(text_config, "mlp_only_layers", None) or [])
    step = int(getattr(text_config, "decoder_sparse_step", 1) or 1)
    experts = int(text_config.num_experts)
    moe = tuple(i for i in range(layers) if i not in only and experts > 0 and (i + 1) % step == 0)
    top_k, normalise = int(text_config.num_experts_per_tok), bool(text_config.norm_topk_prob)
    return ModelFacts(experts, top_k, moe, normalise, num_layers=layers)


def make_stages(recipe: dict[str, Any], text_config: Any) -> list[Any]:
    """The recipe's stages as objects, checked against the model (an impossible budget fails here)."""
    from omniedge.compress.recipe import stage_types

    facts = model_facts(text_config)
    types = stage_types()
    out: list[Any] = []
    for i, st in enumerate(recipe["stages"]):
        ((name, settings),) = st.items()
        out.append(types[name].from_recipe(settings, facts, f"stages[{i}].{name}"))
    return out


def _encode(sk: Any, tokenizer: Any, requests: list[Any], max_tokens: int) -> list[Any]:
    import torch

    from omniedge.compress.calibration import encode_request
    from omniedge.compress.layerwise import Sample

    out = []
    for r in requests:
        enc = encode_request(r, tokenizer, sk.model, max_tokens)
        x = sk.first_layer_input(enc.inputs)
        ids = enc.inputs["input_ids"][0].to(sk.device)
        out.append(Sample(x, ids, enc.modality.to(device=sk.device, dtype=torch.long), enc.kind))
    return out


def _describe(settings: dict[str, Any], samples: list[Any], kind: str) -> dict[str, Any]:
    from omniedge.models.family import MODALITIES

    kinds: dict[str, int] = {}
    tokens = dict.fromkeys(MODALITIES, 0)
    for s in samples:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
        for i, m in enumerate(MODALITIES):
            tokens[m] += int((s.modality == i).sum())
    return {
        "split": kind,
        "source": settings["source"],
        "seed": settings["seed"],
        "requests": len(samples),
        "requests_by_kind": kinds,
        "tokens": tokens,
    }


def compress(model: str | Path, out: Path, recipe: dict[str, Any], progress: bool = True) -> Path:
    """Compress `model` (a checkpoint directory, `tiny`, `omni-mini`, or the random `full` / `full-ci`) into
    `out` as `recipe` says; returns `out`."""
    import torch

    from omniedge.compress.calibration import build_requests, modality_counts
    from omniedge.compress.layerwise import LayerByLayer
    from omniedge.compress.measure import score_streams
    from omniedge.compress.output import (
        DROPPED,
        CheckpointWriter,
        check_disk,
        expected_bytes,
        output_config,
        teacher_bf16_bytes,
        write_side_files,
    )
    from omniedge.compress.prune import PruneStage
    from omniedge.compress.quantize import QuantizeStage
    from omniedge.compress.quantizers import refuse_quantized
    from omniedge.compress.recipe import validate_recipe
    from omniedge.compress.skeleton import ThinkerSkeleton
    from omniedge.models.registry import open_source

    recipe = validate_recipe(recipe)
    from omniedge.distill.recipe_stage import compress_with_distill, has_stage

    if has_stage(recipe):  # distillation needs the whole student: three passes (docs/compress.md)
        return compress_with_distill(model, Path(out), recipe, progress)
    device = _device(recipe["device"])
    dtype = getattr(torch, recipe["dtype"])
    meter = Meter(device)
    with meter.phase("open"):
        src = open_source(model)
        out = Path(out)
        _check_out(src.path, out)
        if "omniedge_quantization" in src.config:
            raise OmniedgeError(
                f"{model} is already an omniedge INT4 checkpoint", "compress the float checkpoint"
            )
        refuse_quantized(src.config)
        sk = ThinkerSkeleton(src.config, src.tensors, device, dtype)
        _check_complete(sk, src.tensors, str(src.path or model))
        if sk.experts_per_layer is not None and any("prune" in st for st in recipe["stages"]):
            raise OmniedgeError(
                f"{model} is already pruned to different expert counts per layer "
                f"({min(sk.experts_per_layer)}-{max(sk.experts_per_layer)}); pruning it again is not supported",
                "prune the original checkpoint with the combined budget, or drop the prune stage",
            )
        stages = make_stages(recipe, sk.text_config)
        need = expected_bytes(sk, stages, dtype)
        teacher_bytes = teacher_bf16_bytes(sk)
        check_disk(out, need)
        source_desc = {**src.description, "files": _hash_dir(src.path)} if src.path else src.description
    cal, mea = recipe["calibration"], recipe["measure"]
    with meter.phase("requests"):
        cal_req = build_requests(cal, modality_counts(cal["samples"], cal["mix"]), "calibration")
        held_counts = {"text": mea["texts"], "image": mea["images"], "audio": mea["audios"]}
        held_req = build_requests(cal, held_counts, "heldout")
    quant = next((s for s in stages if isinstance(s, QuantizeStage)), None)
    with atomic_dir(out, CHECKPOINT) as tmp:
        writer = CheckpointWriter(tmp, dtype, int(recipe["output"]["shard_mb"]) << 20, quant)
        with meter.phase("encode"):
            sk.load_front()
            calib = _encode(sk, src.tokenizer, cal_req, cal["max_tokens"])
            heldout = _encode(sk, src.tokenizer, held_req, mea["max_tokens"])
            if quant is not None:
                tc = sk.text_config
                attn_width = int(tc.num_attention_heads) * int(
                    getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
                )
                quant.check_calibration(
                    sum(s.length for s in calib), {"q_proj": int(tc.hidden_size), "o_proj": attn_width}
                )
            for m in (sk.parts.text_model.embed_tokens, sk.parts.audio_tower, sk.parts.visual):
                writer.add_module(sk, m)
            sk.unload_front()
        engine = LayerByLayer(sk, stages, lambda layer, li, packed: writer.add_layer(sk, layer, packed))
        with meter.phase("layers"):
            streams = engine.run(calib, heldout, progress)
        with meter.phase("score"):
            sk.load_head()
            writer.add_module(sk, sk.parts.text_model.norm)
            head_logits = {}
            if quant is not None and "lm_head" in quant.settings.targets:
                name = "thinker.lm_head.weight"
                packed, w_hat = quant.quantize_head(name, sk.parts.lm_head.weight)
                writer.add_packed(name, packed)
                norm = sk.parts.text_model.norm

                def int4_head(hidden: torch.Tensor) -> torch.Tensor:
                    with torch.inference_mode():
                        return torch.nn.functional.linear(norm(hidden), w_hat)[0].float()

                later = [st.name for st in stages[stages.index(quant) :]]  # scored with the INT4 head
                head_logits = dict.fromkeys(later, int4_head)
            else:
                writer.add_module(sk, sk.parts.lm_head)
            measured = score_streams(sk.logits, heldout, streams.heldout, head_logits)
        with meter.phase("finish"):
            files = writer.close()
            config = output_config(src.config, stages, files.get("int4"), dtype)
            write_side_files(tmp, src.path, src.tokenizer, config)
            prune = next((s for s in stages if isinstance(s, PruneStage)), None)
            torch.save(
                {
                    "layers": [s.to_dict() for s in engine.stats],
                    "saliency": {}
                    if prune is None
                    else {"method": prune.settings.method, "layers": prune.saliency},
                },
                tmp / STATS_FILE,
            )
            records = []
            for st in stages:
                records.append(
                    {
                        "name": st.name,
                        "settings": st.settings.as_dict(),
                        "seconds": round(engine.seconds[st.name], 3),
                        "measured": measured.get(st.name),
                        "result": st.result(),
                    }
                )
            meta = {
                "schema": 2,
                "model": read_meta(src.path).get("model") if src.path else src.name,
                "source": source_desc,
                "recipe": recipe,
                "output": {
                    "text_only": True,
                    "dropped": list(DROPPED),
                    "dtype": str(dtype).removeprefix("torch."),
                    "files": files,
                    "bytes": writer.bytes_by_part(),
                    "expected_bytes": need,
                    "teacher_bf16_bytes": teacher_bytes,
                },
                "calibration": _describe(cal, calib, "calibration"),
                "heldout": _describe(cal, heldout, "heldout"),
                "teacher": measured.get("teacher"),
                "stages": records,
                "layers": {
                    "seconds": {k: round(v, 3) for k, v in engine.seconds.items()},
                    "per_layer_seconds": [round(x, 3) for x in engine.layer_seconds],
                    "report": engine.report,
                },
            }
        meta["model"] = meta["model"] or src.name
        meta["run"] = {
            **meter.summary(),
            "device": str(device),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        }
        meta["files"] = content_hashes(tmp)
        atomic_write_json(tmp / META_FILE, meta)
    if progress:
        print_summary(meta, out)
    return out


def _experts(res: dict[str, Any]) -> str:
    if "experts_after" not in res:
        return ""
    per = sorted(set((res.get("experts_per_layer") or {}).values()))
    after = f"{per[0]}-{per[-1]} per layer" if len(per) > 1 else str(res["experts_after"])
    return f"{res['experts_before']} -> {after}"


def print_summary(meta: dict[str, Any], out: Path) -> None:
    """A short rich table: the teacher, then one row per stage; KL vs the teacher per modality."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"omniedge compress -> {out}")
    for col in ("stage", "experts", "INT4 MiB", "KL text / image / audio", "top-1", "ppl"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    teacher = meta.get("teacher") or {}
    t.add_row("teacher", "", "", "0", "1.000", f"{teacher.get('ppl', float('nan')):.2f}")
    for r in meta["stages"]:
        res, mes = r["result"], r["measured"] or {}
        by = mes.get("by_modality", {})
        t.add_row(
            r["name"],
            _experts(res),
            f"{res['int4_bytes'] / 2**20:.1f}" if "int4_bytes" in res else "",
            " / ".join(f"{by[m]['kl']:.3g}" if m in by else "-" for m in ("text", "image", "audio")),
            f"{mes.get('top1', float('nan')):.3f}",
            f"{mes.get('ppl', float('nan')):.2f}",
        )
    console = Console()
    console.print(t)
    run = meta["run"]
    gpu = run["gpu_peak_bytes"]
    console.print(
        f"{run['seconds']:.1f} s, peak host RSS {run['host_peak_rss_bytes'] / 2**30:.2f} GiB"
        + (f", peak GPU {gpu / 2**30:.2f} GiB" if gpu is not None else "")
        + f"; calibration {meta['calibration']['requests']} requests, tokens {meta['calibration']['tokens']}"
    )


def compress_cli(
    model: str,
    out: Path,
    recipe_path: Path | None,
    keep_ratio: float | None,
    quantize: bool,
    samples: int | None = None,
) -> Path:
    """`omniedge compress`: the recipe file (default recipes/default.yaml) with the CLI's overrides."""
    from omniedge.compress.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(
        load_recipe(recipe_path), keep_ratio=keep_ratio, quantize=quantize, samples=samples
    )
    return compress(model, Path(out), recipe)
