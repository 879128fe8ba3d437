"""What the ONNX Runtime thinker graph is: the config it is built from, the build options, its I/O contract,
and what one decode step costs (bytes read, FLOPs), counted from the initializers it was built with.

export/thinker_ort.py builds the graph; the manifest carries the contract (docs/artifacts.md section 2) and the
decode cost, from which the bench's roofline and Orin projection start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.export.onnx_builder import GraphBuilder

EXPERTS_PER_LAYER = "omniedge_experts_per_layer"  # omniedge.int4_modules.EXPERTS_PER_LAYER (no torch here)


@dataclass(frozen=True)
class TextConfig:
    """What the graph needs of the thinker text config (config.json thinker_config.text_config)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    moe_intermediate: int
    dense_intermediate: int
    experts: int  # the most any layer has
    top_k: int
    norm_topk: bool
    eps: float
    vocab: int
    moe_layers: frozenset[int]
    max_positions: int
    experts_per_layer: tuple[int, ...] = ()  # a non-uniformly pruned checkpoint's count per layer

    def experts_of(self, layer: int) -> int:
        return self.experts_per_layer[layer] if self.experts_per_layer else self.experts

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextConfig:
        t = config.get("thinker_config", config).get("text_config", {})
        try:
            heads = int(t["num_attention_heads"])
            hidden = int(t["hidden_size"])
            layers = int(t["num_hidden_layers"])
            experts = int(t.get("num_experts", 0))
            step = int(t.get("decoder_sparse_step", 1))
            only = set(int(i) for i in t.get("mlp_only_layers", []) or [])
            moe = frozenset(
                i for i in range(layers) if i not in only and experts > 0 and (i + 1) % max(step, 1) == 0
            )
            return cls(
                hidden=hidden,
                layers=layers,
                heads=heads,
                kv_heads=int(t["num_key_value_heads"]),
                head_dim=int(t.get("head_dim") or hidden // heads),
                moe_intermediate=int(t.get("moe_intermediate_size", 0)),
                dense_intermediate=int(t.get("intermediate_size", 0)),
                experts=experts,
                top_k=int(t.get("num_experts_per_tok", 0)),
                norm_topk=bool(t.get("norm_topk_prob", True)),
                eps=float(t.get("rms_norm_eps", 1e-6)),
                vocab=int(t["vocab_size"]),
                moe_layers=moe,
                max_positions=int(t.get("max_position_embeddings", 32768)),
                experts_per_layer=tuple(int(c) for c in t.get(EXPERTS_PER_LAYER) or ()),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise OmniedgeError(
                f"config.json lacks a usable thinker text config ({e})", "pass a Qwen3-Omni checkpoint"
            ) from e


MOE_KERNELS = ("qmoe", "omniedge")
OMNIEDGE_DOMAIN = "ai.omniedge"  # custom ops of kernels/ (a library the runtime registers)
MOE_INT4_OP = "MoEInt4"
MOE_INT4_LIBRARY = "omniedge_moe_int4"  # the library's name in a manifest's thinker_graph.custom_ops


def custom_ops_of(moe_kernel: str) -> list[str]:
    """The custom-op libraries a thinker graph with this MoE kernel needs (manifest thinker_graph.custom_ops)."""
    return [MOE_INT4_LIBRARY] if moe_kernel == "omniedge" else []


@dataclass
class Options:
    """How to build: activation dtype (float16 on GPU: ONNX Runtime's CUDA attention has no float32),
    q/k RMSNorm fused into GroupQueryAttention (CUDA only) or separate, MatMulNBits accuracy level, the MoE
    kernel (ONNX Runtime's QMoE, or omniedge's fused INT4 op)."""

    dtype: str = "float32"
    fused_qk_norm: bool = False
    moe_kernel: str = "qmoe"  # "omniedge": the MoE as MOE_INT4_OP, needs the custom-op library at run time
    accuracy_level: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def np_dtype(self) -> Any:
        return np.float16 if self.dtype == "float16" else np.float32


def io_contract(cfg: TextConfig, num_deepstack: int, dtype: str) -> tuple[list[tuple], list[tuple]]:
    """(inputs, outputs) as (name, dtype, shape). `seq`: new tokens; `max_context`: the KV buffer length
    (a runtime setting, not a rebuild); `rope_rows`: rows of the cos/sin tables (>= past + seq);
    `logits_index`: which of the `seq` new tokens' logits leave the graph."""
    h, kv, hd = cfg.hidden, cfg.kv_heads, cfg.head_dim
    ins: list[tuple] = [("inputs_embeds", dtype, [1, "seq", h])]
    if num_deepstack:
        ins.append(("deepstack_embeds", dtype, [num_deepstack, 1, "seq", h]))
    ins += [
        ("position_ids", "int64", [1, "seq"]),
        ("cos_cache", dtype, ["rope_rows", hd // 2]),
        ("sin_cache", dtype, ["rope_rows", hd // 2]),
        ("seqlens_k", "int32", [1]),
        ("total_sequence_length", "int32", []),
        ("logits_index", "int64", [1]),
    ]
    outs: list[tuple] = [("logits", "float32", [1, cfg.vocab]), ("next_token", "int64", [1])]
    for i in range(cfg.layers):
        for kind in ("key", "value"):
            ins.append((f"past_key_values.{i}.{kind}", dtype, [1, kv, "max_context", hd]))
            outs.append((f"present.{i}.{kind}", dtype, [1, kv, "max_context", hd]))
    return ins, outs


def decode_cost(b: GraphBuilder, cfg: TextConfig, dtype: str) -> dict[str, Any]:
    """What one decode step must read and compute, counted from the graph's initializers: every dense weight
    (attention, norms, routers, lm_head) each token; of the experts only the top-k of each MoE layer; plus the
    KV cache, which grows with the context. The bench's roofline and Orin projection start from this."""
    by_layer: dict[int, int] = {}
    for name, n in b.sizes.items():
        if ".fc1" in name or ".fc2" in name:  # l{i}.fc1, l{i}.fc2_scales, ...
            li = int(name.split(".")[0][1:])
            by_layer[li] = by_layer.get(li, 0) + n
    expert = sum(by_layer.values())
    dense = sum(b.sizes.values()) - expert
    # float matmul weights (routers, a float lm_head): plain MatMul, not MatMulNBits, in the kernel profile
    float_matmul = sum(n for name, n in b.sizes.items() if name.endswith((".router_t", ".weight_t")))
    moe_layers = max(1, len(cfg.moe_layers))
    per_token_experts = sum(n * cfg.top_k / max(1, cfg.experts_of(li)) for li, n in by_layer.items())
    elt = 2 if dtype == "float16" else 4
    attn_params = (
        cfg.hidden * (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.heads * cfg.head_dim * cfg.hidden
    )
    expert_params = 3 * cfg.hidden * cfg.moe_intermediate * cfg.top_k + cfg.hidden * cfg.experts
    dense_mlp = 3 * cfg.hidden * cfg.dense_intermediate
    active = cfg.layers * attn_params + len(cfg.moe_layers) * expert_params
    active += (cfg.layers - len(cfg.moe_layers)) * dense_mlp + cfg.vocab * cfg.hidden
    return {
        "dense_bytes": int(dense),
        "float_matmul_bytes": int(float_matmul),
        "expert_bytes": int(expert),
        "expert_bytes_per_token": float(per_token_experts),
        "expert_bytes_per_layer": float(expert / moe_layers),
        "bytes_per_token_at_zero_context": float(dense + per_token_experts + cfg.hidden * elt),
        "kv_bytes_per_context_token": 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * elt,
        "active_params_per_token": int(active),
        "flops_per_token_at_zero_context": 2 * int(active),
        "attention_flops_per_context_token": 4 * cfg.layers * cfg.heads * cfg.head_dim,
    }
