"""How a prompt is cut before it reaches the thinker graph (runtime/prefill_pieces.py)."""

from __future__ import annotations

import pytest

from omniedge.errors import OmniedgeError
from omniedge.runtime.prefill_pieces import check_buckets, plan_pieces


def test_whole_and_unpadded_pieces() -> None:
    assert plan_pieces(10, (), None, 64) == [(0, 10, 10)]
    assert plan_pieces(10, (), 4, 64) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]


def test_pieces_of_the_largest_bucket_and_a_last_one_padded_to_the_smallest_that_holds_it() -> None:
    b = (128, 256, 1024)
    assert plan_pieces(5, b, None, 4096) == [(0, 5, 128)]
    assert plan_pieces(200, b, None, 4096) == [(0, 200, 256)]
    assert plan_pieces(2100, b, None, 4096) == [(0, 1024, 1024), (1024, 2048, 1024), (2048, 2100, 128)]
    assert plan_pieces(2048, b, None, 4096) == [(0, 1024, 1024), (1024, 2048, 1024)]


def test_pads_that_would_run_past_the_cache_are_left_out() -> None:
    assert plan_pieces(1030, (128, 1024), None, 1100) == [(0, 1024, 1024), (1024, 1030, 6)]
    assert plan_pieces(1030, (128, 1024), None, 1152) == [(0, 1024, 1024), (1024, 1030, 128)]


def test_bucket_settings_that_cannot_work_are_refused() -> None:
    assert check_buckets((512, 128, 128), None, True) == (128, 512)
    assert check_buckets((), 16, False) == ()
    with pytest.raises(OmniedgeError, match="both cut prompts"):
        check_buckets((128,), 64, True)
    with pytest.raises(OmniedgeError, match="below 1"):
        check_buckets((0, 128), None, True)
    with pytest.raises(OmniedgeError, match="no logits_index"):
        check_buckets((128,), None, False)
