"""embed_prompt (omniedge/runtime/generate.py): token rows, media rows over their pads, deepstack at image
positions, in the thinker's input type; a float16 prompt is the float32 one rounded once."""

from __future__ import annotations

import numpy as np
import pytest

from omniedge.errors import OmniedgeError
from omniedge.runtime.generate import embed_prompt


def _case() -> dict:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(np.float16)
    ids = np.array([1, 7, 7, 2, 9, 9, 9, 3])  # 7: image pad, 9: audio pad
    return dict(
        embed_table=table,
        ids=ids,
        image_pad=7,
        image_embeds=rng.standard_normal((2, 8)).astype(np.float32),
        deepstack=rng.standard_normal((3, 2, 8)).astype(np.float32),
        audio_pad=9,
        audio_embeds=rng.standard_normal((3, 8)).astype(np.float32),
        num_deepstack=2,
    )


def test_media_rows_go_over_their_pads_and_deepstack_only_at_image_positions() -> None:
    c = _case()
    x, ds = embed_prompt(**c)
    assert x.dtype == ds.dtype == np.float32 and x.shape == (1, 8, 8) and ds.shape == (2, 1, 8, 8)
    assert np.array_equal(x[0, [0, 3, 7]], c["embed_table"][[1, 2, 3]].astype(np.float32))
    assert np.array_equal(x[0, 1:3], c["image_embeds"]) and np.array_equal(x[0, 4:7], c["audio_embeds"])
    assert np.array_equal(ds[:, 0, 1:3], c["deepstack"][:2]) and not ds[:, 0, [0, 3, 4, 5, 6, 7]].any()


def test_a_float16_prompt_is_the_float32_one_rounded_once() -> None:
    c = _case()
    x32, ds32 = embed_prompt(**c)
    x16, ds16 = embed_prompt(**c, dtype=np.float16)
    assert x16.dtype == ds16.dtype == np.float16
    assert np.array_equal(x16, x32.astype(np.float16)) and np.array_equal(ds16, ds32.astype(np.float16))
    assert not np.shares_memory(x16, c["embed_table"])  # media rows were written into a copy


def test_a_pad_count_that_differs_from_the_encoder_is_refused() -> None:
    c = _case()
    c["audio_embeds"] = c["audio_embeds"][:2]
    with pytest.raises(OmniedgeError, match="3 audio pad tokens but the encoder made 2"):
        embed_prompt(**c)


def test_the_portable_graph_takes_float32_whatever_its_dtype() -> None:
    from omniedge.runtime.manifest import ThinkerGraphSpec

    spec = dict(inv_freq=(1.0,), rope_axis=(0,), rope_scaling=1.0, providers=())
    assert ThinkerGraphSpec(flavour="ort", dtype="float16", **spec).input_dtype == "float16"
    assert ThinkerGraphSpec(flavour="portable", dtype="float16", **spec).input_dtype == "float32"
