"""The ONNX Runtime flavour of the thinker graph, built op by op from a checkpoint's tensors (no torch model).

Decode reads only what a token needs: every INT4 linear is one `MatMulNBits` (q/k/v fused into one), the
MoE of a layer is one `QMoE` node (raw router logits in; it takes top-k, softmax over those k, which is
Qwen3's softmax -> top-k -> renormalise; INT4 experts interleaved gate/up, SwiGLU; float experts take the
`MoE` op with the same routing and layout), attention is one
`GroupQueryAttention` over a KV buffer preallocated for the whole context and shared by past and present
(bound to one device buffer by the runtime: updated in place, never concatenated), with the rotary
embedding applied inside it from cos/sin tables the runtime binds (a plain-position table for decode,
per-token M-RoPE rows for a prefill with images). Residual adds are fused into the RMSNorms
(`SkipSimplifiedLayerNormalization`). Only one position's logits leave the graph (`logits_index`: the
prompt's last token, which need not be the run's last when the runtime pads a prompt), plus their argmax
(greedy decoding reads 8 bytes, not the vocabulary). No If, no Loop, no Shape: every shape is a constant,
so ONNX Runtime can capture the decode step as a CUDA graph.

Graph contract (docs/artifacts.md section 2, flavour "ort"): `thinker_spec.io_contract`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from omniedge.errors import OmniedgeError
from omniedge.export.onnx_builder import MS_DOMAIN, GraphBuilder
from omniedge.export.ort_weights import Weights, qmoe_weight
from omniedge.export.thinker_spec import (
    MOE_INT4_OP,
    OMNIEDGE_DOMAIN,
    Options,
    TextConfig,
    decode_cost,
    io_contract,
)
from omniedge.weights import TensorSource, fused_experts, layer_prefix


class ThinkerBuilder:
    """Emits the graph layer by layer; each weight is read, written to the external data, and dropped."""

    def __init__(
        self, b: GraphBuilder, w: Weights, cfg: TextConfig, opts: Options, num_deepstack: int
    ) -> None:
        self.b, self.w, self.cfg, self.opts, self.nd = b, w, cfg, opts, num_deepstack
        self.dt = opts.np_dtype

    # ------------------------------------------------------------ pieces

    def linear(self, x: str, names: list[str], n_out: list[int], k: int, tag: str) -> str:
        """x @ W^T for one weight or several fused along N (q/k/v): MatMulNBits when INT4, else MatMul."""
        packed = [self.w.packed(f"{n}.weight", k) for n in names]
        if all(p is not None for p in packed):
            qw = np.concatenate([p[0] for p in packed], axis=0)  # type: ignore[index]
            sc = np.concatenate([p[1] for p in packed], axis=0)  # type: ignore[index]
            n = int(qw.shape[0])
            ins = [x, self.b.const(f"{tag}.qweight", qw), self.b.const(f"{tag}.scales", sc.reshape(-1))]
            if not self.w.symmetric:  # input 3: packed uint8 zero points [N * ceil(nb/2)]
                zp = np.concatenate([p[2] for p in packed], axis=0)  # type: ignore[index]
                ins.append(self.b.const(f"{tag}.zero_points", zp.reshape(-1)))
            return self.b.op(
                "MatMulNBits",
                ins,
                domain=MS_DOMAIN,
                name=tag,
                K=k,
                N=n,
                bits=4,
                block_size=self.w.group,
                accuracy_level=self.opts.accuracy_level,
            )
        if any(p is not None for p in packed):
            raise OmniedgeError(
                f"{', '.join(names)} are partly INT4, partly float", "quantize all of them or none"
            )
        wt = np.concatenate([self.w.float(f"{n}.weight") for n in names], axis=0)
        if wt.shape != (sum(n_out), k):
            raise OmniedgeError(
                f"{names[0]} has shape {wt.shape}, expected {(sum(n_out), k)}", "check the config"
            )
        return self.b.op("MatMul", [x, self.b.const(f"{tag}.weight_t", np.ascontiguousarray(wt.T))], name=tag)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.b.op("Reshape", [x, self.b.ints(shape)])

    def rms_norm(self, x: str, weight: str, tag: str) -> str:
        return self.norm_by(x, self.b.const(tag, self.w.float(weight)))

    def norm_by(self, x: str, weight_const: str) -> str:
        return self.b.op("SimplifiedLayerNormalization", [x, weight_const], axis=-1, epsilon=self.cfg.eps)

    def skip_norm(self, x: str, skip: str, weight: str, tag: str) -> tuple[str, str]:
        """(rms_norm(x + skip), x + skip)."""
        outs = self.b.op(
            "SkipSimplifiedLayerNormalization",
            [x, skip, self.b.const(tag, self.w.float(weight))],
            n_out=4,
            domain=MS_DOMAIN,
            epsilon=self.cfg.eps,
        )
        return outs[0], outs[3]

    # ------------------------------------------------------------ blocks

    def attention(self, i: int, x: str) -> str:
        c, p = self.cfg, f"{layer_prefix(i)}self_attn."
        q_n, kv_n = c.heads * c.head_dim, c.kv_heads * c.head_dim
        # the per-head norm weights first, so both q/k-norm variants lay out the same external data
        qn = self.b.const(f"l{i}.q_norm", self.w.float(f"{p}q_norm.weight"))
        kn = self.b.const(f"l{i}.k_norm", self.w.float(f"{p}k_norm.weight"))
        qkv = self.linear(
            x, [f"{p}q_proj", f"{p}k_proj", f"{p}v_proj"], [q_n, kv_n, kv_n], c.hidden, f"l{i}.qkv"
        )
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        common = ["seqlens_k", "total_sequence_length", "cos_cache", "sin_cache", "position_ids"]
        attrs = dict(num_heads=c.heads, kv_num_heads=c.kv_heads, do_rotary=1, rotary_interleaved=0)
        if self.opts.fused_qk_norm:
            ins = [qkv, "", "", past_k, past_v, *common, "", "", "", "", qn, kn]
            attrs["qk_norm_epsilon"] = c.eps
        else:
            q, k, v = self.b.op("Split", [qkv, self.b.ints([q_n, kv_n, kv_n], "split")], n_out=3, axis=-1)
            q = self.reshape(self.norm_by(self.reshape(q, [0, 0, c.heads, c.head_dim]), qn), [0, 0, q_n])
            k = self.reshape(self.norm_by(self.reshape(k, [0, 0, c.kv_heads, c.head_dim]), kn), [0, 0, kv_n])
            ins = [q, k, v, past_k, past_v, *common]
        out = f"l{i}.attn"
        self.b.op_into(
            "GroupQueryAttention",
            ins,
            [out, f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            **attrs,
        )
        return self.linear(out, [f"{p}o_proj"], [c.hidden], q_n, f"l{i}.o_proj")

    def moe(self, i: int, x: str) -> str:
        c, p = self.cfg, f"{layer_prefix(i)}mlp."
        if not c.norm_topk:
            raise OmniedgeError(
                "norm_topk_prob=false is not expressible with QMoE's routing in this exporter",
                "export --flavour portable",
            )
        g = self.w.group
        h, inter = c.hidden, c.moe_intermediate
        order = np.stack([np.arange(inter), np.arange(inter) + inter], axis=1).reshape(
            -1
        )  # gate j, up j, ...
        x2 = self.reshape(x, [-1, h])
        router = self.b.const(f"l{i}.router_t", np.ascontiguousarray(self.w.float(f"{p}gate.weight").T))
        logits = self.b.op("MatMul", [x2, router], name=f"l{i}.router")
        attrs: dict[str, Any] = dict(
            k=c.top_k,
            activation_type="swiglu",
            swiglu_fusion=1,  # fc1 rows interleaved: gate j, up j
            activation_alpha=1.0,  # silu(gate) * up: no GPT-OSS alpha/beta/limit
            activation_beta=0.0,
            normalize_routing_weights=1,  # top-k of the logits, softmax over those k
        )
        gate_up = self.w.packed(f"{p}experts.gate_up_proj", h)
        down = self.w.packed(f"{p}experts.down_proj", inter)
        if gate_up is None or down is None:  # float experts: the MoE op, same routing and layout
            if self.opts.moe_kernel == "omniedge":
                raise OmniedgeError(
                    f"layer {i}: the omniedge MoE kernel takes INT4 experts; this checkpoint's are float",
                    "export with --moe-kernel qmoe, or compress with an INT4 quantize stage first",
                )
            fused = fused_experts(self.w.source, i)
            if fused is None:
                raise OmniedgeError(
                    f"the checkpoint has no experts for layer {i}", "pass a complete checkpoint"
                )
            fc1 = fused[0].float().numpy().astype(self.dt)[:, order]
            fc2 = fused[1].float().numpy().astype(self.dt)
            self._check_experts(i, fc1.shape[:2], fc2.shape[:2])
            y = self.b.op(
                "MoE",
                [x2, logits, self.b.const(f"l{i}.fc1", fc1), "", self.b.const(f"l{i}.fc2", fc2)],
                domain=MS_DOMAIN,
                name=f"l{i}.moe",
                **attrs,
            )
            return self.reshape(y, [1, -1, h])
        self._check_experts(i, gate_up[0].shape[:2], down[0].shape[:2])
        fc1, s1, blocked1 = qmoe_weight(gate_up[0][:, order], gate_up[1][:, order], h, g)
        fc2, s2, blocked2 = qmoe_weight(down[0], down[1], inter, g)
        zero_points: list[str] = []
        if not self.w.symmetric:  # slots 11/12: fc1/fc2 zero points [E, N, ceil(nb/2)], rows as fc1's
            if not blocked1:
                raise OmniedgeError(
                    f"QMoE zero points need expert widths ({h}, {inter}) that are multiples of the group {g}",
                    "quantize with symmetric: true or a group that divides the widths",
                )
            zp1, zp2 = gate_up[2][:, order], down[2]  # type: ignore[index]
            zero_points = ["", "", "", "", self.b.const(f"l{i}.fc1_zero_points", np.ascontiguousarray(zp1))]
            zero_points.append(self.b.const(f"l{i}.fc2_zero_points", np.ascontiguousarray(zp2)))
        if blocked1 != blocked2:
            raise OmniedgeError(
                f"QMoE needs both expert widths ({h}, {inter}) to be multiples of the group {g}, or both <= it",
                "export --flavour portable",
            )
        if self.opts.moe_kernel == "omniedge":
            return self.reshape(
                self._moe_int4(i, x2, logits, fc1, s1, fc2, s2, blocked1 and blocked2), [1, -1, h]
            )
        attrs["expert_weight_bits"] = 4
        # raw [E, N, K/2] initializers: the CUDA provider lays them out for its kernels at load (PrePack); its
        # default (-1) means "already in the CUDA layout", which silently computes garbage on raw weights
        attrs["weights_prepacked"] = 0
        if blocked1:
            attrs["block_size"] = g
        y = self.b.op(
            "QMoE",
            [
                x2,
                logits,
                self.b.const(f"l{i}.fc1", fc1),
                self.b.const(f"l{i}.fc1_scales", s1),
                "",
                self.b.const(f"l{i}.fc2", fc2),
                self.b.const(f"l{i}.fc2_scales", s2),
                *zero_points,
            ],
            domain=MS_DOMAIN,
            name=f"l{i}.moe",
            **attrs,
        )
        return self.reshape(y, [1, -1, h])

    def _moe_int4(
        self, i: int, x2: str, logits: str, fc1: Any, s1: Any, fc2: Any, s2: Any, blocked: bool
    ) -> str:
        """omniedge's fused MoE op (kernels/moe_int4/moe_int4_op.cc) on QMoE's tensors: symmetric, blocked."""
        if not self.w.symmetric or not blocked:
            raise OmniedgeError(
                f"layer {i}: the omniedge MoE kernel takes symmetric INT4 experts whose widths are multiples of the "
                f"group {self.w.group}",
                "export with --moe-kernel qmoe, or quantize with symmetric: true and a group dividing the widths",
            )
        ins = [x2, logits, self.b.const(f"l{i}.fc1", fc1), self.b.const(f"l{i}.fc1_scales", s1)]
        ins += [self.b.const(f"l{i}.fc2", fc2), self.b.const(f"l{i}.fc2_scales", s2)]
        return self.b.op(
            MOE_INT4_OP, ins, domain=OMNIEDGE_DOMAIN, name=f"l{i}.moe", k=self.cfg.top_k, group=self.w.group
        )

    def _check_experts(self, i: int, fc1: tuple[int, ...], fc2: tuple[int, ...]) -> None:
        c, e = self.cfg, self.cfg.experts_of(i)
        if tuple(fc1) != (e, 2 * c.moe_intermediate) or tuple(fc2) != (e, c.hidden):
            raise OmniedgeError(
                f"layer {i}: experts are {tuple(fc1)} / {tuple(fc2)}, the config says {e} experts of "
                f"intermediate {c.moe_intermediate}",
                "the config and weights disagree: re-run `omniedge compress`",
            )

    def dense_mlp(self, i: int, x: str) -> str:
        c, p = self.cfg, f"{layer_prefix(i)}mlp."
        inter = c.dense_intermediate
        gu = self.linear(x, [f"{p}gate_proj", f"{p}up_proj"], [inter, inter], c.hidden, f"l{i}.gate_up")
        gate, up = self.b.op("Split", [gu, self.b.ints([inter, inter], "split")], n_out=2, axis=-1)
        act = self.b.op("Mul", [self.b.op("Mul", [gate, self.b.op("Sigmoid", [gate])]), up])
        return self.linear(act, [f"{p}down_proj"], [c.hidden], inter, f"l{i}.down")

    # ------------------------------------------------------------ the graph

    def build(self, progress: Any = None) -> None:
        c, b = self.cfg, self.b
        ins, outs = io_contract(c, self.nd, self.opts.dtype)
        for name, dtype, shape in ins:
            b.input(name, np.dtype(dtype), shape)
        for name, dtype, shape in outs:
            b.output(name, np.dtype(dtype), shape)
        resid = "inputs_embeds"
        h = self.rms_norm(resid, f"{layer_prefix(0)}input_layernorm.weight", "l0.input_norm")
        mlp_out = ""
        for i in range(c.layers):
            if i > 0:
                h, resid = self.skip_norm(
                    resid, mlp_out, f"{layer_prefix(i)}input_layernorm.weight", f"l{i}.input_norm"
                )
            attn = self.attention(i, h)
            h, resid = self.skip_norm(
                resid, attn, f"{layer_prefix(i)}post_attention_layernorm.weight", f"l{i}.post_norm"
            )
            mlp_out = self.moe(i, h) if i in c.moe_layers else self.dense_mlp(i, h)
            if i < self.nd:  # deepstack: visual features added after the first layers (zero off the image)
                ds = b.op("Gather", ["deepstack_embeds", b.ints([i], "idx")], axis=0)
                mlp_out = b.op("Add", [mlp_out, self.reshape(ds, [1, -1, c.hidden])])
            if progress is not None:
                progress.update(1)
        normed, _ = self.skip_norm(resid, mlp_out, "thinker.model.norm.weight", "final_norm")
        # the one position whose logits leave the graph (the prompt's last real token: a padded prompt's pads
        # come after it)
        last = b.op("Gather", [normed, "logits_index"], axis=1)
        logits = self.linear(last, ["thinker.lm_head"], [c.vocab], c.hidden, "lm_head")
        logits = self.reshape(logits, [1, c.vocab])
        b.op_into("Cast", [logits], ["logits"], to=1)
        b.op_into("ArgMax", [logits], ["next_token"], axis=-1, keepdims=0)


def export_thinker_ort(
    source: TensorSource,
    config: dict[str, Any],
    path: Path,
    num_deepstack: int,
    opts: Options,
    progress: bool = True,
    data_of: Path | None = None,
) -> dict[str, Any]:
    """Write thinker.onnx (+ thinker.onnx.data) for `config` from `source`; memory stays about one layer.
    Returns the decode cost (`decode_cost`) for the manifest.

    `data_of`: an existing thinker graph whose `.data` file this graph shares (a variant with other options
    over the very same weights, e.g. the fused q/k norm): only the .onnx is written."""
    from tqdm.auto import tqdm

    cfg = TextConfig.from_config(config)
    w = Weights(source, config, opts.np_dtype)
    if data_of is not None:
        b = GraphBuilder("thinker", path, data_path=Path(str(data_of) + ".data"), write_data=False)
    else:
        b = GraphBuilder("thinker", path)
    bar = tqdm(total=cfg.layers, desc="thinker layers", unit="layer", disable=not progress, leave=False)
    ThinkerBuilder(b, w, cfg, opts, num_deepstack).build(bar)
    bar.close()
    doc = json.dumps({"flavour": "ort", "dtype": opts.dtype, "fused_qk_norm": opts.fused_qk_norm})
    b.save(doc)
    return decode_cost(b, cfg, opts.dtype)
