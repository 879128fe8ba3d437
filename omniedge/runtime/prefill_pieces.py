"""How a prompt goes through the thinker graph: whole, in unpadded pieces (`prefill_chunk`), or in pieces of a
few fixed lengths (`prefill_buckets`, the last padded), and why fixed lengths on CUDA: runtime/thinker_ort.py."""

from __future__ import annotations

from omniedge.errors import OmniedgeError

# Prompt pieces on CUDA (runtime/thinker_ort.py says why): short prompts padded to 128 tokens (a 1..128-token
# prefill costs about the same there), longer ones in 512-token pieces: GPU memory 13% over weights + KV at 4096
# tokens of context where 1024-token pieces took 15% and whole prompts 44%; a 4096-token prompt takes 343-404 ms
# to its first token where 1024-token pieces took 311-323 (bench/results/2026-12-01-h200-prefill-shapes.md).
CUDA_PREFILL_BUCKETS = (128, 256, 512)


def check_buckets(buckets: tuple[int, ...], chunk: int | None, has_logits_index: bool) -> tuple[int, ...]:
    """The piece lengths, ascending; one clear error for a setting that cannot work."""
    if not buckets:
        return ()
    if chunk is not None:
        raise OmniedgeError(
            "prefill_chunk and prefill_buckets both cut prompts into pieces",
            "pass one of them (prefill_buckets pads the last piece; prefill_chunk does not)",
        )
    if any(int(b) < 1 for b in buckets):
        raise OmniedgeError(
            f"prefill_buckets {list(buckets)} has a length below 1", "pass positive token counts"
        )
    if not has_logits_index:
        raise OmniedgeError(
            "this bundle's thinker graph has no logits_index input, so a padded prompt's logits cannot be read",
            "re-export the bundle with this omniedge (omniedge export), or run without prefill_buckets",
        )
    return tuple(sorted({int(b) for b in buckets}))


def plan_pieces(
    seq: int, buckets: tuple[int, ...], chunk: int | None, max_context: int
) -> list[tuple[int, int, int]]:
    """(start, end, width) per piece of a `seq`-token prompt: tokens start..end-1 run as `width` tokens
    (width > end - start: zero pads after them, up to the smallest bucket that holds them). Pieces of the
    largest bucket (or of `chunk`, unpadded); a last piece whose pads would run past `max_context` runs
    unpadded (a new shape, correct but slow the first time)."""
    if not buckets:
        step = chunk or seq
        return [(s, min(seq, s + step), min(seq, s + step) - s) for s in range(0, seq, step)]
    big, out = buckets[-1], []
    for start in range(0, seq, big):
        end = min(seq, start + big)
        width = next(b for b in buckets if b >= end - start)
        if start + width > max_context:
            width = end - start
        out.append((start, end, width))
    return out
