"""Runtime preprocessing (numpy only) against transformers' own processors and audio-encoder helpers."""

from __future__ import annotations

import numpy as np
import pytest

from omniedge.runtime.preprocess import (
    audio_chunks,
    image_inputs,
    log_mel,
    mel_filter_bank,
    num_audio_tokens,
    patchify,
    resize_image,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _speechlike(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t) + 0.05 * rng.standard_normal(n)
    x[: n // 5] = 0.0  # a silent lead-in exercises the log floor and the max-8 clamp
    return x.astype(np.float32)


# ---------------------------------------------------------------- log-mel


def test_mel_filter_bank_equals_whisper_feature_extractor() -> None:
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
    ours = mel_filter_bank(128, 400, 16000, 0.0, 8000.0)
    assert ours.shape == fe.mel_filters.shape == (201, 128)
    np.testing.assert_array_equal(ours, fe.mel_filters)


@pytest.mark.parametrize("n", [401, 12345, 16000, 40007, 16000 * 7 + 3])
def test_log_mel_matches_whisper_feature_extractor(n: int) -> None:
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    x = _speechlike(n, seed=n)
    # The Qwen3-Omni processor's audio settings: pad to the longest (no padding for one clip), keep the mask.
    ref = fe(
        x,
        sampling_rate=16000,
        padding=True,
        truncation=False,
        return_attention_mask=True,
        return_tensors="np",
    )
    frames = int(ref["attention_mask"][0].sum())
    ours = log_mel(x)
    assert ours.shape == (128, n // 160) and frames == n // 160
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref["input_features"][0][:, :frames], atol=1e-4, rtol=0)


def test_log_mel_silence_is_finite_and_flat() -> None:
    m = log_mel(np.zeros(16000, np.float32))
    assert np.isfinite(m).all()
    np.testing.assert_allclose(m, -1.5)  # log10(1e-10) = -10 -> (-10 + 4) / 4


# ---------------------------------------------------------------- audio chunk metadata


def _hf_helpers():  # transformers 5.17 may not have the module-level helpers
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

    needed = (
        "chunk_and_pad_features",
        "get_valid_indices",
        "get_audio_cu_seqlens",
        "_get_feat_extract_output_lengths",
    )
    if not all(hasattr(m, f) for f in needed):
        pytest.skip("this transformers has no module-level audio chunk helpers")
    return m


@pytest.mark.parametrize("frames", [1, 7, 60, 99, 100, 101, 250, 799, 800, 801, 1234, 3000])
def test_audio_chunks_match_transformers(frames: int) -> None:
    m = _hf_helpers()
    rng = np.random.default_rng(frames)
    feats = rng.standard_normal((128, frames)).astype(np.float32)
    ours = audio_chunks(feats, n_window=50, n_window_infer=800)
    lens = torch.tensor([frames])
    padded, chunk_lengths = m.chunk_and_pad_features(torch.from_numpy(feats), lens, 50)
    valid = m.get_valid_indices(chunk_lengths, 50)
    cu = m.get_audio_cu_seqlens(chunk_lengths, lens, 800, 50)

    # Both pad to the longest chunk: padding further would change the last tokens (conv biases).
    np.testing.assert_array_equal(ours.padded_features, padded.numpy())
    np.testing.assert_array_equal(ours.chunk_lengths, chunk_lengths.numpy())
    np.testing.assert_array_equal(ours.valid_indices, valid.numpy())
    np.testing.assert_array_equal(ours.cu_seqlens, cu.numpy())
    # window_ids is cu_seqlens in per-token form
    expect = np.repeat(np.arange(cu.numel() - 1), np.diff(cu.numpy()))
    np.testing.assert_array_equal(ours.window_ids, expect)
    n_tok = int(m._get_feat_extract_output_lengths(lens, 50)[0])
    assert ours.num_tokens == num_audio_tokens(frames) == n_tok == ours.valid_indices.size


def test_audio_token_counts_are_13_per_second() -> None:
    assert num_audio_tokens(100) == 13  # one full chunk (1 s of 10 ms frames)
    assert num_audio_tokens(3000) == 390  # 30 s
    assert num_audio_tokens(1) == 1


# ---------------------------------------------------------------- images


def _qwen2vl_processor(h: int, w: int):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as P
    except ImportError:
        try:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as P
        except ImportError:
            return None
    return P(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=h * w,
        max_pixels=h * w,
    )


def _reference_patchify(image: np.ndarray, patch: int = 16, temporal: int = 2, merge: int = 2) -> np.ndarray:
    """Qwen2-VL's layout written with torch ops, for transformers builds whose processor needs torchvision."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).double().mul(1 / 255).float()
    x = (x - 0.5) / 0.5
    x = x.unsqueeze(0).repeat(temporal, 1, 1, 1)  # [T, C, H, W]
    c, h, w = x.shape[1:]
    gh, gw = h // patch, w // patch
    x = x.reshape(1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * temporal * patch * patch).numpy()


@pytest.mark.parametrize(
    ("size", "src"), [((64, 64), (70, 70)), ((64, 64), (64, 64)), ((128, 96), (130, 100))]
)
def test_patchify_matches_qwen2vl_image_processor(size: tuple[int, int], src: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    pv, grid = image_inputs(img, size)
    h, w = size
    assert grid == (1, h // 16, w // 16)
    assert pv.shape == (h * w // 256, 3 * 2 * 16 * 16) and pv.dtype == np.float32
    np.testing.assert_array_equal(pv, _reference_patchify(resize_image(img, size)))
    proc = _qwen2vl_processor(h, w)
    if proc is None:
        pytest.skip("no Qwen2-VL image processor importable without torchvision")
    # Sources chosen so transformers' smart_resize lands on the same size: the full pipeline must agree.
    ref = proc(images=[img], return_tensors="np")
    np.testing.assert_array_equal(ref["image_grid_thw"], [list(grid)])
    np.testing.assert_array_equal(pv, ref["pixel_values"])


def test_patchify_rows_are_merge_groups() -> None:
    # A 64x64 image whose 16x16 patches are numbered 0..15 row-major: rows must come 2x2 block by block.
    img = np.zeros((64, 64, 3), np.uint8)
    for r in range(4):
        for c in range(4):
            img[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = 10 * (r * 4 + c)
    pv, _ = patchify(img)
    order = np.round((pv[:, 0] * 0.5 + 0.5) * 255 / 10).astype(int)
    np.testing.assert_array_equal(order, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
    # columns are (channel, frame, pixel): both temporal copies of a patch are the same frame
    per_channel = pv.reshape(16, 3, 2, 256)
    np.testing.assert_array_equal(per_channel[:, :, 0], per_channel[:, :, 1])


def test_patchify_rejects_sizes_off_the_grid() -> None:
    with pytest.raises(ValueError, match="multiple"):
        patchify(np.zeros((48, 64, 3), np.uint8))
