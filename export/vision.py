"""The vision graph: one image at a fixed size -> image_embeds and deepstack_embeds (docs/artifacts.md §2).

A fixed size makes grid_thw a constant, so transformers' data-dependent parts (position-embedding
interpolation, rotary positions, cu_seqlens) are computed once here, by running transformers' own
encoder up to its first block, and baked into the graph as constants. One image is one attention
window, so attention is plain full attention. The blocks and mergers reuse transformers' modules.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omniedge.errors import OmniedgeError
from omniedge.export.int4_graph import Int4Store, linear
from omniedge.export.onnx_io import export_graph, rotate_half

DEFAULT_SIZE = 448  # Qwen's usual image side: 196 tokens with patch 16 and merge 2


def default_image_size(vision_config: Any) -> int:
    """448 when the learned position grid covers at least 448 px (real model: 48x48 patches of 16 = 768 px),
    else half the grid's native side rounded down to a multiple of patch*merge (tiny model: 8x8 grid of
    16 px patches = 128 px -> 64). Half keeps toy graphs small while still exercising interpolation."""
    patch, merge = int(vision_config.patch_size), int(vision_config.spatial_merge_size)
    native = patch * math.isqrt(int(vision_config.num_position_embeddings))
    if native >= DEFAULT_SIZE:
        return DEFAULT_SIZE
    unit = patch * merge
    return max(unit, (native // 2) // unit * unit)


def check_image_size(size: int, vision_config: Any) -> int:
    unit = int(vision_config.patch_size) * int(vision_config.spatial_merge_size)
    if not isinstance(size, int) or size <= 0 or size % unit:
        raise OmniedgeError(
            f"image size {size} is not a positive multiple of patch*merge = {unit}",
            f"pass --image-size as a multiple of {unit}, e.g. {default_image_size(vision_config)}",
        )
    return size


def grid_for(size: int, vision_config: Any) -> tuple[int, int, int]:
    side = size // int(vision_config.patch_size)
    return (1, side, side)


def patch_dim(vision_config: Any) -> int:
    c = int(getattr(vision_config, "in_channels", 3))
    return c * int(vision_config.temporal_patch_size) * int(vision_config.patch_size) ** 2


class _StopAtFirstBlock(Exception):
    pass


@torch.no_grad()
def vision_constants(visual: nn.Module, grid_thw: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """(pos_embeds [P, hidden], cos [P, head_dim], sin [P, head_dim]) for one image of this grid.

    Runs transformers' encoder with the patch embedding zeroed and stops at block 0: what block 0 then
    receives is exactly the interpolated position embedding, and its rotary (cos, sin). Works whatever
    helper functions a transformers release uses inside `forward`."""
    captured: dict[str, Any] = {}

    def zero_patches(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out)

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]
        raise _StopAtFirstBlock

    n = grid_thw[0] * grid_thw[1] * grid_thw[2]
    pixels = torch.zeros(n, patch_dim(visual.config), dtype=visual.patch_embed.proj.weight.dtype)
    h1 = visual.patch_embed.register_forward_hook(zero_patches)
    h2 = visual.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        visual(pixels, grid_thw=torch.tensor([list(grid_thw)]))
    except _StopAtFirstBlock:
        pass
    finally:
        h1.remove()
        h2.remove()
    cos, sin = captured["rope"]
    return captured["hidden"].clone(), cos.clone(), sin.clone()


class _Attention(nn.Module):
    def __init__(self, attn: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.qkv = linear(attn.qkv, names[id(attn.qkv)], store)
        self.proj = linear(attn.proj, names[id(attn.proj)], store)
        self.heads = int(attn.num_heads)
        self.scaling = float(attn.scaling)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s = h.shape[0]
        q, k, v = self.qkv(h).reshape(s, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, heads, D]
        c, sn = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = q * c + rotate_half(q) * sn
        k = k * c + rotate_half(k) * sn
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, S, D]
        w = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scaling, dim=-1)
        return self.proj(torch.matmul(w, v).transpose(0, 1).reshape(s, -1))


class _Block(nn.Module):
    def __init__(self, blk: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.norm1, self.norm2 = blk.norm1, blk.norm2
        self.attn = _Attention(blk.attn, names, store)
        self.fc1 = linear(blk.mlp.linear_fc1, names[id(blk.mlp.linear_fc1)], store)
        self.fc2 = linear(blk.mlp.linear_fc2, names[id(blk.mlp.linear_fc2)], store)
        self.act = blk.mlp.act_fn

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), cos, sin)
        return h + self.fc2(self.act(self.fc1(self.norm2(h))))


class _Merger(nn.Module):
    """transformers' patch merger (2x2 neighbours -> one token), with INT4-aware linears."""

    def __init__(self, m: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.ln_q = m.ln_q
        self.post_norm = bool(m.use_postshuffle_norm)
        self.width = int(m.hidden_size)
        self.fc1 = linear(m.mlp[0], names[id(m.mlp[0])], store)
        self.act = m.mlp[1]
        self.fc2 = linear(m.mlp[2], names[id(m.mlp[2])], store)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ln_q(h.reshape(-1, self.width) if self.post_norm else h).reshape(-1, self.width)
        return self.fc2(self.act(self.fc1(h)))


class VisionGraph(nn.Module):
    """pixel_values [P, 3*2*16*16] -> (image_embeds [P/4, text_hidden], deepstack [nd, P/4, text_hidden])."""

    def __init__(
        self,
        visual: nn.Module,
        grid_thw: tuple[int, int, int],
        names: dict[int, str],
        store: Int4Store | None,
    ) -> None:
        super().__init__()
        pos, cos, sin = vision_constants(visual, grid_thw)
        self.register_buffer("pos_embeds", pos)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.patch_embed = visual.patch_embed  # Conv3d with stride = kernel: float (a 5-D weight)
        self.blocks = nn.ModuleList(_Block(b, names, store) for b in visual.blocks)
        self.deepstack_at = [int(i) for i in visual.config.deepstack_visual_indexes]
        self.deepstack = nn.ModuleList(_Merger(m, names, store) for m in visual.merger_list)
        self.merger = _Merger(visual.merger, names, store)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.patch_embed(pixel_values) + self.pos_embeds
        feats = []
        for i, blk in enumerate(self.blocks):
            h = blk(h, self.cos, self.sin)
            if i in self.deepstack_at:
                feats.append(self.deepstack[self.deepstack_at.index(i)](h))
        merged = self.merger(h)
        deepstack = torch.stack(feats, dim=0) if feats else merged.new_zeros((0, *merged.shape))
        return merged, deepstack


def export_vision(
    visual: nn.Module,
    names: dict[int, str],
    store: Int4Store | None,
    image_size: int,
    path: Path,
    custom_table: dict[Any, Any],
) -> Path:
    """Write vision.onnx for square images of `image_size` px (static shapes)."""
    grid = grid_for(image_size, visual.config)
    graph = VisionGraph(visual, grid, names, store).eval()
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim(visual.config))
    return export_graph(
        graph,
        (pixels,),
        path,
        input_names=["pixel_values"],
        output_names=["image_embeds", "deepstack_embeds"],
        custom_translation_table=custom_table,
    )
