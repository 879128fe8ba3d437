"""The audio graph: log-mel chunks + chunk metadata -> audio_embeds (docs/artifacts.md §2).

transformers computes chunking, valid positions and attention windows (cu_seqlens) from the audio
length inside `forward`, with Python loops; here the runtime computes them in numpy and passes them in
(`valid_indices`, `window_ids`), so one graph serves every length. Attention is restricted to tokens of
the same window by a mask (window_ids equal), which is what transformers' per-window split computes.
The conv stack, encoder layers and projections reuse transformers' modules and weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from omniedge.export.int4_graph import Int4Store, linear, module_names
from omniedge.export.onnx_io import export_graph


def conv_tokens(frames: int) -> int:
    """Tokens the three stride-2 convs make from `frames` mel frames of one chunk (13 from 100)."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        a = layer.self_attn
        self.ln1, self.ln2 = layer.self_attn_layer_norm, layer.final_layer_norm
        self.q, self.k, self.v, self.o = (
            linear(m, names[id(m)], store) for m in (a.q_proj, a.k_proj, a.v_proj, a.out_proj)
        )
        self.fc1 = linear(layer.fc1, names[id(layer.fc1)], store)
        self.fc2 = linear(layer.fc2, names[id(layer.fc2)], store)
        self.act = layer.activation_fn
        self.heads = int(a.num_heads)
        self.scaling = float(a.scaling)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = h.shape[0]
        x = self.ln1(h)
        q, k, v = (p(x).reshape(t, self.heads, -1).transpose(0, 1) for p in (self.q, self.k, self.v))
        w = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scaling + mask, dim=-1)
        h = h + self.o(torch.matmul(w, v).transpose(0, 1).reshape(t, -1))
        return h + self.fc2(self.act(self.fc1(self.ln2(h))))


class AudioGraph(nn.Module):
    """(padded_features [C, n_mels, F], valid_indices [T], window_ids [T]) -> audio_embeds [T, text_hidden]."""

    def __init__(self, tower: nn.Module, names: dict[int, str], store: Int4Store | None) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = tower.conv2d1, tower.conv2d2, tower.conv2d3
        self.conv_out = linear(tower.conv_out, names[id(tower.conv_out)], store)
        # transformers keeps this table as a non-persistent buffer; the graph needs it as a constant
        self.register_buffer("positions", tower.positional_embedding.positional_embedding.detach().clone())
        self.layers = nn.ModuleList(_Layer(layer, names, store) for layer in tower.layers)
        self.ln_post = tower.ln_post
        self.proj1 = linear(tower.proj1, names[id(tower.proj1)], store)
        self.act = tower.act
        self.proj2 = linear(tower.proj2, names[id(tower.proj2)], store)

    def forward(
        self, padded_features: torch.Tensor, valid_indices: torch.Tensor, window_ids: torch.Tensor
    ) -> torch.Tensor:
        x = padded_features.unsqueeze(1)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        b, c, f, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(b, t, c * f))
        x = x + self.positions[:t].unsqueeze(0)
        h = torch.index_select(x.reshape(-1, x.shape[-1]), 0, valid_indices)
        same = window_ids.unsqueeze(1) == window_ids.unsqueeze(0)
        mask = torch.zeros(same.shape, dtype=h.dtype).masked_fill(~same, float("-inf"))
        for layer in self.layers:
            h = layer(h, mask)
        return self.proj2(self.act(self.proj1(self.ln_post(h))))


def example_inputs(tower: nn.Module, num_chunks: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Export-time inputs: full chunks but the last, which is shorter (sizes > 1 keep dims symbolic)."""
    cfg = tower.config
    frames = 2 * int(cfg.n_window)
    per = conv_tokens(frames)
    last = conv_tokens(frames // 2 + 7)
    valid = torch.cat([torch.arange(per) + i * per for i in range(num_chunks - 1)])
    valid = torch.cat([valid, torch.arange(last) + (num_chunks - 1) * per])
    window = per * (int(cfg.n_window_infer) // frames)
    windows = torch.arange(valid.numel()) // max(1, min(window, valid.numel() // 2))
    feats = torch.randn(num_chunks, int(cfg.num_mel_bins), frames)
    return feats, valid.to(torch.int64), windows.to(torch.int64)


def export_audio(
    tower: nn.Module,
    names: dict[int, str] | None,
    store: Int4Store | None,
    path: Path,
    custom_table: dict[Any, Any],
) -> Path:
    """Write audio.onnx with dynamic num_chunks, chunk_frames and num_tokens."""
    graph = AudioGraph(tower, names or module_names(tower), store).eval()
    Dim = torch.export.Dim
    chunks, frames, tokens = (
        Dim("num_chunks"),
        Dim("chunk_frames", max=2 * int(tower.config.n_window)),
        Dim("num_tokens"),
    )
    return export_graph(
        graph,
        example_inputs(tower),
        path,
        input_names=["padded_features", "valid_indices", "window_ids"],
        output_names=["audio_embeds"],
        dynamic_shapes={
            "padded_features": {0: chunks, 2: frames},
            "valid_indices": {0: tokens},
            "window_ids": {0: tokens},
        },
        custom_translation_table=custom_table,
    )
