"""Faster kernels for training, each checked or timed before it is used: the encoders' per-chunk attention
as one block-diagonal SDPA call, and the fastest of transformers' experts implementations."""

from __future__ import annotations

import sys
import time
from typing import Any

from omniedge.errors import OmniedgeError

BLOCKDIAG = "flash_blockdiag_sdpa"  # "flash" in the name makes the encoders hand over cu_seqlens


def blockdiag_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention within each cu_seqlens chunk as ONE masked SDPA call (same math as a call per chunk)."""
    import torch
    import torch.nn.functional as F

    n = query.shape[-2]
    seg = torch.searchsorted(
        cu_seq_lens_q[1:].to(query.device), torch.arange(n, device=query.device), right=True
    )
    mask = seg[:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _encode(parts: Any, batch: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(encoder, its output) for each encoder whose input the batch has."""
    th = parts.thinker
    out = []
    if "pixel_values" in batch and parts.visual is not None:
        feats = th.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
        out.append((parts.visual, feats))
    if "input_features" in batch and parts.audio_tower is not None:
        feats = th.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
        out.append((parts.audio_tower, feats.last_hidden_state))
    return out


def set_encoder_attention(model: Any, batch: dict[str, Any], enable: bool) -> str:
    """Switch the encoders that `batch` exercises to block-diagonal SDPA if it reproduces the per-chunk
    result (an encoder already switched stays so)."""
    import torch
    from transformers import AttentionInterface

    from omniedge.models.family import thinker_parts

    parts = thinker_parts(model)
    if not enable:
        return ",".join(str(e.config._attn_implementation) for e in (parts.visual, parts.audio_tower) if e)
    AttentionInterface.register(BLOCKDIAG, blockdiag_sdpa)
    with torch.no_grad():
        ref = _encode(parts, batch)
        todo = [(e, r) for e, r in ref if e.config._attn_implementation != BLOCKDIAG]
        before = [e.config._attn_implementation for e, _ in todo]
        for e, _ in todo:
            e.config._attn_implementation = BLOCKDIAG
        try:
            new = dict((id(e), f) for e, f in _encode(parts, batch))
            err = max(
                (float((new[id(e)] - r).abs().max() / r.abs().max().clamp_min(1e-6)) for e, r in todo),
                default=0.0,
            )
        except Exception as exc:  # an internal API moved: keep the per-chunk path
            print(f"block-diagonal encoder attention unavailable ({type(exc).__name__}: {exc})", flush=True)
            err = float("inf")
    if err > 1e-4:
        for (e, _), b in zip(todo, before, strict=True):
            e.config._attn_implementation = b
        print(f"encoder attention: per chunk (block-diagonal rel. error {err:.2e})", flush=True)
        return ",".join(str(b) for b in before)
    if todo:
        print(f"encoder attention: block-diagonal SDPA (rel. error vs per chunk {err:.1e})", flush=True)
    return BLOCKDIAG


def restore_encoder_attention(model: Any, impl: str = "sdpa") -> None:
    from omniedge.models.family import thinker_parts

    parts = thinker_parts(model)
    for e in (parts.visual, parts.audio_tower):
        if e is not None and e.config._attn_implementation == BLOCKDIAG:
            e.config._attn_implementation = impl


def pick_experts_implementation(model: Any, requested: str, device: Any, step: Any) -> str:
    """`requested`, or with "auto" on CUDA the fastest experts kernel that runs `step()` (forward+backward)."""
    import torch

    if requested != "auto":
        model.set_experts_implementation(requested)
        return requested
    if getattr(device, "type", str(device)) != "cuda":
        model.set_experts_implementation("eager")
        return "eager"
    timings: dict[str, float] = {}
    for impl in ("grouped_mm", "eager"):
        try:
            model.set_experts_implementation(impl)
            for rep in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                if rep == 2:
                    timings[impl] = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
        except Exception as e:  # an unsupported kernel/dtype combination: skip it
            print(f"experts_implementation={impl} failed: {type(e).__name__}: {e}", file=sys.stderr)
            model.zero_grad(set_to_none=True)
    if not timings:
        raise OmniedgeError(
            "no experts implementation ran a training step", "check the torch/transformers install"
        )
    best = min(timings, key=timings.__getitem__)
    print(f"experts implementation timings (s/step): {timings} -> {best}", flush=True)
    model.set_experts_implementation(best)
    return best
