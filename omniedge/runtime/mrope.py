"""M-RoPE position ids (temporal, height, width) for a Qwen3-Omni prompt, and the decode-time offset.

Text and audio tokens count up one position per token on all three axes. An image's tokens share one
start position and spread over (t, h, w) of its merged patch grid; the token after the image continues
from the largest position the image used, plus one. This is transformers' `get_rope_index` for images
and audio (video is not a runtime input); tests check it equals transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omniedge.errors import OmniedgeError


def rope_index(
    ids: np.ndarray,
    special_tokens: dict[str, int],
    image_grids: Sequence[tuple[int, int, int]] = (),
    merge_size: int = 2,
    position_id_per_seconds: float = 13.0,
) -> tuple[np.ndarray, int]:
    """(position_ids int64 [3, seq], delta) where a later token at cache index i gets position i + delta.

    `image_grids` are the (t, h, w) patch grids of the images in prompt order.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.size
    pos = np.zeros((3, n), dtype=np.int64)
    vs = special_tokens.get("vision_start", -1)
    pad = special_tokens.get("image_pad", -2)
    if special_tokens.get("video_pad", -3) in ids:
        raise OmniedgeError("video prompts are not supported by this runtime", "pass frames as images")
    nxt, i, img = 0, 0, 0
    while i < n:
        if ids[i] == vs and i + 1 < n and ids[i + 1] == pad:
            pos[:, i] = nxt  # <|vision_start|>
            start = nxt + 1
            run = 1
            while i + 1 + run < n and ids[i + 1 + run] == pad:
                run += 1
            if img >= len(image_grids):
                raise OmniedgeError("the prompt has more images than image inputs", "pass one grid per image")
            t, h, w = image_grids[img]
            gh, gw = h // merge_size, w // merge_size
            if t * gh * gw != run:
                raise OmniedgeError(
                    f"image {img} has {run} pad tokens but its grid {t}x{h}x{w} makes {t * gh * gw}",
                    "build the prompt with the image's num_tokens",
                )
            tt = (np.arange(t) * position_id_per_seconds).astype(np.int64)
            block = np.stack(
                [
                    np.repeat(tt, gh * gw),
                    np.tile(np.repeat(np.arange(gh), gw), t),
                    np.tile(np.arange(gw), t * gh),
                ]
            )
            pos[:, i + 1 : i + 1 + run] = block + start
            nxt = int(block.max()) + start + 1
            i += 1 + run
            img += 1
            continue
        pos[:, i] = nxt
        nxt += 1
        i += 1
    if img != len(image_grids):
        raise OmniedgeError(
            f"{len(image_grids)} images given but the prompt has {img}", "one image per pad run"
        )
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


def decode_positions(cache_len: int, delta: int, count: int = 1) -> np.ndarray:
    """position_ids [3, 1, count] for `count` new tokens after `cache_len` cached ones."""
    p = np.arange(cache_len, cache_len + count, dtype=np.int64) + delta
    return np.broadcast_to(p, (3, 1, count)).copy()


def rope_rows(
    positions: np.ndarray, inv_freq: np.ndarray, axis: np.ndarray, scaling: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [seq, head_dim/2] for M-RoPE positions [3, seq]: frequency j turns with the position
    of its axis (`axis[j]`, read off transformers' rotary module at export, docs/artifacts.md)."""
    pos = np.asarray(positions, dtype=np.float32).reshape(3, -1)
    # float32 angles, as transformers computes them (position * inv_freq in float32): [seq, half]
    angles = pos[np.asarray(axis), :].T * np.asarray(inv_freq, dtype=np.float32)[None, :]
    return (np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32)
