"""The thinker graph: one graph for prefill and decode, KV cache in and out (docs/artifacts.md §2).

Reuses the text model's own layers: norms, q/k/v/o projections, q_norm/k_norm, and its rotary module
(M-RoPE with interleaved sections, called with position_ids [3, 1, seq]). The MoE block routes like
transformers (softmax -> top-k -> renormalise) and gathers only the chosen experts' weights, like its
`batched_mm` experts: no data-dependent loop, so the graph has no Loop/If/NonZero. Deepstack features
arrive dense (zeros off the image positions) and are added after decoder layers 0..num_deepstack-1,
which equals transformers' masked add at the visual positions.

Decode gathers only the top-k experts' weights; prefill (seq > 1, an ONNX If on the same initializers)
dequantizes every expert once and runs all tokens through all experts, masked by the routing weights:
memory no longer grows with k expert copies per token, at E/k times the expert FLOPs of top-k. Grouping
tokens by expert (or ORT's MoE/QMoE ops) would save those FLOPs too; that is a later step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniedge.export.int4_graph import ExpertBank, Int4Store, linear
from omniedge.export.onnx_io import export_graph, rotate_half


class _Attention(nn.Module):
    def __init__(self, attn: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (
            linear(m, names[id(m)], store) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        )
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.head_dim = int(attn.head_dim)
        self.groups = int(attn.num_key_value_groups)
        self.scaling = float(attn.scaling)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = h.shape
        shape = (b, s, -1, self.head_dim)
        q = self.q_norm(self.q(h).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k(h).view(shape)).transpose(1, 2)
        v = self.v(h).view(shape).transpose(1, 2)
        c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * sn
        k = k * c + rotate_half(k) * sn
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        kr = k.repeat_interleave(self.groups, dim=1)
        vr = v.repeat_interleave(self.groups, dim=1)
        w = torch.softmax(torch.matmul(q, kr.transpose(2, 3)) * self.scaling + mask, dim=-1)
        out = torch.matmul(w, vr).transpose(1, 2).reshape(b, s, -1)
        return self.o(out), k, v


class _MoE(nn.Module):
    """Router softmax -> top-k (renormalised if norm_topk_prob) -> gathered experts, weighted sum."""

    def __init__(self, block: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        gate, experts = block.gate, block.experts
        self.router = linear(gate.weight, f"{names[id(gate)]}.weight", store)
        self.top_k = int(gate.top_k)
        self.norm_topk = bool(getattr(gate, "norm_topk_prob", True))
        self.gate_up = ExpertBank(experts.gate_up_proj, f"{names[id(experts)]}.gate_up_proj", store)
        self.down = ExpertBank(experts.down_proj, f"{names[id(experts)]}.down_proj", store)
        self.act = experts.act_fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        # One graph, two paths sharing the same (INT4) weights through an ONNX If: a decode step gathers
        # only its top-k experts; a prefill dequantizes every expert once and runs all tokens through all
        # of them, masked by the routing weights, instead of copying k experts' weights per token.
        y = torch.cond(x.shape[0] > 1, self._all_experts, self._gathered, (x, top_w, top_i))
        return y.view_as(h)

    def _gathered(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        ids = top_i.reshape(-1)
        xs = x.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, x.shape[-1], 1)  # [T*k, H, 1]
        gate, up = torch.matmul(self.gate_up.gather(ids), xs).squeeze(-1).chunk(2, dim=-1)
        y = torch.matmul(self.down.gather(ids), (self.act(gate) * up).unsqueeze(-1)).squeeze(-1)
        y = y * top_w.reshape(-1, 1).to(y.dtype)
        return y.view(-1, self.top_k, y.shape[-1]).sum(dim=1)

    def _all_experts(self, x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        anchor = torch.ones_like(x[:, 0]).mean()  # 1.0 of dynamic shape, so never a constant: ExpertBank.all
        gate, up = torch.einsum("th,enh->ten", x, self.gate_up.all(anchor)).chunk(2, dim=-1)  # [T, E, I]
        y = torch.einsum("tei,ehi->teh", self.act(gate) * up, self.down.all(anchor))  # [T, E, H]
        weights = torch.zeros(x.shape[0], y.shape[1], dtype=y.dtype).scatter(1, top_i, top_w.to(y.dtype))
        return (y * weights.unsqueeze(-1)).sum(dim=1)


class _DenseMLP(nn.Module):
    def __init__(self, mlp: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.gate, self.up, self.down = (
            linear(m, names[id(m)], store) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )
        self.act = mlp.act_fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(h)) * self.up(h))


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.attn = _Attention(layer.self_attn, names, store)
        moe = hasattr(layer.mlp, "experts")
        self.mlp = _MoE(layer.mlp, names, store) if moe else _DenseMLP(layer.mlp, names, store)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn(self.ln1(x), cos, sin, mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.ln2(x)), k, v


class ThinkerGraph(nn.Module):
    """(inputs_embeds, position_ids, deepstack_embeds, past k/v per layer) -> (logits, present k/v ...)."""

    def __init__(
        self, text_model: nn.Module, lm_head: nn.Module, names: dict[int, str], store: Int4Store | None
    ) -> None:
        super().__init__()
        self.rotary = text_model.rotary_emb
        self.layers = nn.ModuleList(_Layer(layer, names, store) for layer in text_model.layers)
        self.norm = text_model.norm
        self.lm_head = linear(lm_head, names[id(lm_head)], store)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        deepstack_embeds: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        seq, past_len = inputs_embeds.shape[1], past[0].shape[2]
        cos, sin = self.rotary(inputs_embeds, position_ids)
        q_pos = torch.arange(seq, device=inputs_embeds.device) + past_len
        k_pos = torch.arange(past_len + seq, device=inputs_embeds.device)
        allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # causal over past + seq
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype).masked_fill(~allowed, float("-inf"))
        x = inputs_embeds
        presents: list[torch.Tensor] = []
        num_deepstack = deepstack_embeds.shape[0]
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            if i < num_deepstack:
                x = x + deepstack_embeds[i]
        return (self.lm_head(self.norm(x)), *presents)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The contract's input and output names for a thinker of `num_layers` layers."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "position_ids", "deepstack_embeds", *past], ["logits", *present]


def export_thinker(
    text_model: nn.Module,
    lm_head: nn.Module,
    num_deepstack: int,
    names: dict[int, str],
    store: Int4Store | None,
    path: Path,
    custom_table: dict[Any, Any],
) -> Path:
    """Write thinker.onnx with dynamic seq and past (past may be 0: the first prefill)."""
    cfg = text_model.config
    graph = ThinkerGraph(text_model, lm_head, names, store).eval()
    n_layers, kv_heads = len(text_model.layers), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    seq, past_len, hidden = 5, 3, int(cfg.hidden_size)
    past = [torch.randn(1, kv_heads, past_len, head_dim) for _ in range(2 * n_layers)]
    args = (
        torch.randn(1, seq, hidden),
        torch.arange(past_len, past_len + seq).view(1, 1, -1).expand(3, 1, -1).contiguous(),
        torch.zeros(num_deepstack, 1, seq, hidden),
        past,
    )
    Dim = torch.export.Dim
    s, p = Dim("seq"), Dim("past")
    inputs, outputs = io_names(n_layers)
    return export_graph(
        graph,
        args,
        path,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes={
            "inputs_embeds": {1: s},
            "position_ids": {2: s},
            "deepstack_embeds": {2: s},
            "past": [{2: p} for _ in past],
        },
        custom_translation_table=custom_table,
    )
