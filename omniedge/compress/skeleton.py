"""The teacher thinker with every weight on the meta device, filled from a tensor source one part at a time.

This is how compression meets a 35B model in bounded memory (llm-compressor's sequential onloading):
the embeddings and encoders are loaded to turn requests into the hidden states that enter decoder layer 0,
then one decoder layer at a time is built on the device from the source, used, and emptied again.

transformers' own code does the multimodal part (placeholder merging, M-RoPE positions, the causal mask,
deepstack inputs): a stand-in for layer 0 records what the text model hands its first layer and stops the
forward there, so nothing of that logic is copied here and it follows whatever the installed release does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from omniedge.errors import OmniedgeError
from omniedge.int4_modules import experts_per_layer, resize_experts
from omniedge.meta_init import empty_model, set_parameter
from omniedge.models.family import thinker_parts
from omniedge.weights import TensorSource, canonical_name, fused_experts

_EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class _Stop(Exception):
    """Raised by the stand-in for layer 0 once it has recorded its inputs."""


class _FirstLayerInputs(nn.Module):
    """Stands in for decoder layer 0: records (hidden_states, kwargs) and stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.got: tuple[torch.Tensor, dict[str, Any]] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError(
                "decoder layers are expected to get everything but the hidden states by keyword"
            )
        self.got = (hidden_states, kwargs)
        raise _Stop


@dataclass
class LayerInput:
    """One request as decoder layer 0 receives it, plus what the text model adds after early layers."""

    hidden: torch.Tensor  # [1, S, H] on the device
    kwargs: dict[str, Any]  # attention mask, position ids and embeddings: passed to every layer as is
    visual_mask: torch.Tensor | None  # [1, S] bool: image positions (deepstack targets)
    deepstack: list[torch.Tensor] | None  # per early layer, [num image tokens, H]


class ThinkerSkeleton:
    """A Qwen3-Omni thinker of `config` whose parameters live in `source` until a part is loaded."""

    def __init__(self, config: dict[str, Any], source: TensorSource, device: Any, dtype: torch.dtype) -> None:
        # Text out only: the talker and code2wav are never built.
        self.model = empty_model({**config, "enable_audio_output": False}, dtype).eval()
        counts = experts_per_layer(config.get("thinker_config", {}).get("text_config", {}))
        if counts is not None:  # a checkpoint pruned to different expert counts per layer
            resize_experts(self.model, counts)
        self.experts_per_layer = counts
        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.parts = thinker_parts(self.model)
        self.text_config = self.parts.text_model.config
        self.layers = self.parts.text_model.layers
        self._names = {id(m): n for n, m in self.model.named_modules()}
        for m in self.model.modules():  # buffers (rotary tables, sinusoids) are real: move them once
            for k, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[k] = b.to(self.device)

    # ------------------------------------------------------------ parameters

    def canonical(self, module: nn.Module) -> dict[str, str]:
        """{parameter name inside `module`: canonical checkpoint name}."""
        prefix = self._names[id(module)]
        return {n: canonical_name(f"{prefix}.{n}") for n, _ in module.named_parameters()}

    def load(self, module: nn.Module) -> nn.Module:
        """Fill `module`'s parameters from the source, on the device, in the compute dtype."""
        names = self.canonical(module)
        layer = self.layer_index(module)
        fused = None
        for pname, cname in names.items():
            if layer is not None and pname in _EXPERT_PARAMS:
                if fused is None:
                    fused = fused_experts(self.source, layer, self.device)
                    if fused is None:
                        raise OmniedgeError(
                            f"layer {layer} has no experts in the checkpoint", "check the checkpoint"
                        )
                t = fused[_EXPERT_PARAMS.index(pname)]
            else:
                t = self.source.get(cname, self.device)
            set_parameter(module, pname, t.to(device=self.device, dtype=self.dtype))
        return module

    def layer_index(self, module: nn.Module) -> int | None:
        for i, layer in enumerate(self.layers):
            if layer is module:
                return i
        return None

    @staticmethod
    def unload(module: nn.Module) -> None:
        """Give `module`'s parameters back (to the meta device): its memory is freed."""
        for m in module.modules():
            for k, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[k] = nn.Parameter(p.detach().to("meta"), requires_grad=False)

    # ------------------------------------------------------------ inputs of layer 0

    def load_front(self) -> None:
        """Embeddings and both encoders: what turns a request into layer 0's input."""
        for m in (self.parts.text_model.embed_tokens, self.parts.audio_tower, self.parts.visual):
            if m is not None:
                self.load(m)

    def unload_front(self) -> None:
        for m in (self.parts.text_model.embed_tokens, self.parts.audio_tower, self.parts.visual):
            if m is not None:
                self.unload(m)

    def first_layer_input(self, inputs: dict[str, torch.Tensor]) -> LayerInput:
        """Run the thinker on one request's tensors up to decoder layer 0 and return what layer 0 gets."""
        text = self.parts.text_model
        deep: dict[str, Any] = {}

        def keep_deepstack(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            deep.update(
                visual_mask=kwargs.get("visual_pos_masks"), deepstack=kwargs.get("deepstack_visual_embeds")
            )

        stand_in = _FirstLayerInputs()
        first = self.layers[0]
        self.layers[0] = stand_in
        hook = text.register_forward_pre_hook(keep_deepstack, with_kwargs=True)
        try:
            with torch.inference_mode():
                self.parts.thinker(**{k: v.to(self.device) for k, v in inputs.items()}, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
            self.layers[0] = first
        if stand_in.got is None:
            raise RuntimeError("the thinker never reached decoder layer 0")
        hidden, kwargs = stand_in.got
        ds = deep.get("deepstack")
        return LayerInput(hidden, kwargs, deep.get("visual_mask"), list(ds) if ds is not None else None)

    # ------------------------------------------------------------ the head

    def load_head(self) -> None:
        self.load(self.parts.text_model.norm)
        self.load(self.parts.lm_head)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, vocab] float32 logits of final-layer hidden states [1, S, H]."""
        with torch.inference_mode():
            return self.parts.lm_head(self.parts.text_model.norm(hidden))[0].float()


def add_deepstack(hidden: torch.Tensor, x: LayerInput, layer: int) -> torch.Tensor:
    """The visual deepstack features after early decoder layers, as transformers' text model adds them."""
    if x.deepstack is None or layer >= len(x.deepstack) or x.visual_mask is None:
        return hidden
    mask = x.visual_mask.to(hidden.device)
    hidden = hidden.clone()
    hidden[mask, :] = hidden[mask, :] + x.deepstack[layer].to(hidden.device, hidden.dtype)
    return hidden
