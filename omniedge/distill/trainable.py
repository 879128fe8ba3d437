"""What the student trains, and INT4 fake quantization for quantization-aware distillation.

- `all`: every parameter of the thinker (encoders included).
- `experts`: the MoE experts and their routers only (`mlp.experts.*`, `mlp.gate.*` of the text decoder):
  what pruning changed; attention, embeddings, encoders and lm_head stay the teacher's.
- `lora`: low-rank adapters (peft) on the text decoder's attention projections and fused experts,
  merged into the weights at the end, so the checkpoint has the student's ordinary layout.

Fake INT4 (`--int4 qat`): every weight the compress stage would quantize (its `layer_targets`) is seen by
the forward pass as dequantize(quantize(w)) with omniedge.int4's round-to-nearest, and the gradient goes
straight through to the float weight; quantizing the final weights with the same RTN then gives exactly
the weights the student was trained through.
"""

from __future__ import annotations

from typing import Any

from omniedge.errors import OmniedgeError


def _decoder_prefix(thinker: Any) -> str:
    from omniedge.models.family import thinker_parts

    text = thinker_parts(thinker).text_model
    return next(n for n, m in thinker.named_modules() if m is text)


def select_trainable(
    thinker: Any, what: str, lora_rank: int = 16, lora_alpha: float = 32.0
) -> tuple[Any, dict[str, Any]]:
    """(module to train: the thinker, or its peft wrapper for LoRA; a description for omniedge.json)."""
    if what == "lora":
        return _with_lora(thinker, lora_rank, lora_alpha)
    prefix = _decoder_prefix(thinker) + ".layers."
    n_train = 0
    for name, p in thinker.named_parameters():
        train = what == "all" or (
            name.startswith(prefix) and (".mlp.experts." in name or ".mlp.gate." in name)
        )
        p.requires_grad_(train)
        n_train += p.numel() if train else 0
    if n_train == 0:
        raise OmniedgeError(f"--train {what} selects no parameter of this model", "use --train all")
    total = sum(p.numel() for p in thinker.parameters())
    return thinker, {"train": what, "trainable_params": n_train, "total_params": total}


def _with_lora(thinker: Any, rank: int, alpha: float) -> tuple[Any, dict[str, Any]]:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise OmniedgeError(
            "--train lora needs the peft package, which is not installed",
            "pip install peft (or use --train all / --train experts)",
        ) from e
    prefix = _decoder_prefix(thinker) + ".layers."
    modules = [
        n for n, _ in thinker.named_modules()
        if n.startswith(prefix) and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]  # fmt: skip
    has_experts = any(".mlp.experts" in n for n, _ in thinker.named_parameters())
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=modules,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if has_experts else None,
    )
    wrapped = get_peft_model(thinker, cfg)
    n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in thinker.parameters() if not p.requires_grad)
    return wrapped, {
        "train": "lora",
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_modules": len(modules)
        + (
            2 * len([1 for n, _ in thinker.named_modules() if n.endswith("mlp.experts")])
            if has_experts
            else 0
        ),
        "trainable_params": n_train,
        "total_params": total,
    }


def merge_lora(trained: Any) -> Any:
    """The plain thinker with the adapters merged into its weights (a no-op for a plain module)."""
    if hasattr(trained, "merge_and_unload"):
        return trained.merge_and_unload()
    return trained


# ---------------------------------------------------------------- INT4 fake quantization


def _fake_int4_module(group_size: int) -> Any:
    import torch

    from omniedge import int4

    class FakeInt4(torch.nn.Module):
        """w -> dequantize(quantize(w)) forward, identity backward (straight-through estimator)."""

        def __init__(self) -> None:
            super().__init__()
            self.group_size = group_size

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            q, s = int4.quantize(w, self.group_size)
            fq = int4.dequantize(q, s, w.shape[-1]).to(device=w.device, dtype=w.dtype)
            return w + (fq - w).detach()

    return FakeInt4()


def quantized_weights(thinker: Any, targets: list[str]) -> list[tuple[Any, str]]:
    """(owning module, parameter name) of every weight the compress stage's quantizer would touch."""
    from omniedge.compress.quantize import layer_targets  # the one list of what INT4 covers
    from omniedge.models.family import thinker_parts

    out = []
    for layer in thinker_parts(thinker).text_model.layers:
        out += [(owner, pname) for _, owner, pname in layer_targets(layer, targets)]
    return out


def add_fake_int4(thinker: Any, targets: list[str], group_size: int) -> int:
    """Route every quantized weight through FakeInt4 (torch parametrizations); returns how many."""
    from torch.nn.utils import parametrize

    found = quantized_weights(thinker, targets)
    for owner, pname in found:
        parametrize.register_parametrization(owner, pname, _fake_int4_module(group_size))
    return len(found)


def remove_fake_int4(thinker: Any) -> None:
    """Back to plain float parameters holding the trained (latent) weights, not their INT4 rounding."""
    from torch.nn.utils import parametrize

    for module in list(thinker.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
