"""RTN INT4 (group 128) of the thinker text model's attention projections and fused experts.

gpt-fast's two verbs: `create_quantized_state_dict` makes the packed tensors (int4.safetensors, names
`<state_dict name>.qweight` / `.scales`), `convert_for_runtime` puts the dequantized weights back into
the model so PyTorch computes with exactly the numbers the exported graphs will. Router, embeddings,
norms, lm_head and the encoders stay in float.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omniedge import int4
from omniedge.models.family import thinker_parts

INT4_FILE = "int4.safetensors"
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # fused [E, N, K]: gate_up [E, 2I, H], down [E, H, I]


def target_parameters(model: Any, targets: list[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """(state_dict name, parameter) of every weight the recipe's targets name, in layer order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: list[tuple[str, torch.nn.Parameter]] = []
    for layer in thinker_parts(model).text_model.layers:
        if "attention" in targets:
            for proj in ATTENTION_PROJS:
                mod = getattr(layer.self_attn, proj, None)
                if mod is not None:
                    out.append((names[id(mod.weight)], mod.weight))
        experts = getattr(layer.mlp, "experts", None)
        if "experts" in targets and experts is not None:
            for pname in EXPERT_PARAMS:
                p = getattr(experts, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                    out.append((names[id(p)], p))
    return out


def create_quantized_state_dict(
    model: Any, settings: dict[str, Any], progress: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({name.qweight: uint8, name.scales: float32} on CPU, [quantized parameter names])."""
    from tqdm.auto import tqdm

    group = int(settings["group_size"])
    tensors: dict[str, torch.Tensor] = {}
    params = target_parameters(model, list(settings["targets"]))
    for name, p in tqdm(params, desc="quantizing", unit="tensor", disable=not progress):
        q, s = int4.quantize(p.detach(), group)
        tensors[f"{name}.qweight"] = q.cpu()
        tensors[f"{name}.scales"] = s.cpu()
    return tensors, [n for n, _ in params]


def convert_for_runtime(model: Any, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """Overwrite each quantized parameter with its dequantized value (the weights transformers computes with)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            p = params[name]
            w = int4.dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], p.shape[-1])
            p.copy_(w.to(device=p.device, dtype=p.dtype))


def quantization_config(settings: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The `omniedge_quantization` entry of config.json (docs/artifacts.md)."""
    return {
        "method": settings["method"],
        "bits": int4.BITS,
        "group_size": int(settings["group_size"]),
        "symmetric": True,
        "zero_point": int4.ZERO_POINT,
        "file": INT4_FILE,
        "modules": list(names),
    }


def quantize_model(model: Any, settings: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Quantize in place; returns {"tensors", "modules", "config"} and records the config on the model."""
    tensors, names = create_quantized_state_dict(model, settings, progress)
    convert_for_runtime(model, tensors, names)
    cfg = quantization_config(settings, names)
    model.config.omniedge_quantization = cfg
    return {"tensors": tensors, "modules": names, "config": cfg}


def write_int4(tensors: dict[str, torch.Tensor], directory: str | Path, group_size: int) -> Path:
    """int4.safetensors in `directory` (called inside the checkpoint's temporary directory)."""
    from safetensors.torch import save_file

    path = Path(directory) / INT4_FILE
    meta = {
        "format": "omniedge-int4",
        "bits": str(int4.BITS),
        "group_size": str(group_size),
        "zero_point": "8",
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def int4_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
