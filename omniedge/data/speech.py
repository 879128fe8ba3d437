"""Synthetic speech: espeak-ng speaks a sentence (in process, from the espeakng-loader wheel: no apt
package), scipy resamples it to 16 kHz, numpy adds gain and noise. Deterministic, thread- and
process-safe (omniedge.data.espeak).

Voices are `<accent>+<variant>` (espeak-ng -v en-us+m3). The variant sets are disjoint per split, so
validation and test voices are never heard in training. Log-mel features are Whisper's (128 bins,
n_fft 400, hop 160) computed by transformers' WhisperFeatureExtractor, the same as Qwen3-Omni's processor.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass

import numpy as np

from omniedge.data import espeak
from omniedge.errors import OmniedgeError

SAMPLE_RATE = 16000
N_MELS = 128
HOP = 160

ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
# espeak-ng voice variants (espeak-ng --voices=variant); extreme ones (whisper, croak, robots) left out.
VARIANTS: dict[str, tuple[str, ...]] = {
    "train": (
        "m1",
        "m2",
        "m4",
        "m6",
        "m7",
        "f1",
        "f2",
        "f4",
        "klatt",
        "klatt3",
        "Alex",
        "Andy",
        "Annie",
        "david",
        "edward",
        "john",
        "max",
        "paul",
        "robert",
        "steph",
        "linda",
        "norbert",
        "quincy",
        "travis",
    ),
    "val": ("m5", "f5", "klatt2", "michel", "rob"),
    "test": ("m3", "f3", "klatt4", "victor", "iven"),
}
# (low, high) per setting; test draws from inside the training range, so only the voice is new.
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "train": {"speed": (130, 210), "pitch": (20, 80), "gain_db": (-28, -14), "noise_db": (-70, -40)},
    "val": {"speed": (140, 200), "pitch": (25, 75), "gain_db": (-26, -16), "noise_db": (-65, -45)},
    "test": {"speed": (140, 200), "pitch": (25, 75), "gain_db": (-26, -16), "noise_db": (-65, -45)},
}


@dataclass(frozen=True)
class Voice:
    """How one utterance is spoken: voice, words per minute, pitch (0-99), speech RMS and noise RMS in dBFS."""

    voice: str
    speed: int
    pitch: int
    gain_db: float
    noise_db: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def require_tools() -> None:
    """Fail early, naming the pip package, when espeak-ng (espeakng-loader) or a voice variant is missing."""
    installed = installed_variants()
    absent = sorted({v for vs in VARIANTS.values() for v in vs} - installed)
    if absent:
        raise OmniedgeError(
            f"espeak-ng lacks voice variants {absent}",
            "pip install --upgrade espeakng-loader   (0.2.4 ships espeak-ng 1.52 with all of them)",
        )


def installed_variants() -> frozenset[str]:
    return espeak.variants()


def sample_voice(rng: np.random.Generator, split: str) -> Voice:
    r = RANGES[split]
    accent = ACCENTS[int(rng.integers(len(ACCENTS)))]
    variant = VARIANTS[split][int(rng.integers(len(VARIANTS[split])))]
    return Voice(
        voice=f"{accent}+{variant}",
        speed=int(rng.integers(r["speed"][0], r["speed"][1] + 1)),
        pitch=int(rng.integers(r["pitch"][0], r["pitch"][1] + 1)),
        gain_db=round(float(rng.uniform(*r["gain_db"])), 1),
        noise_db=round(float(rng.uniform(*r["noise_db"])), 1),
    )


def speak_16k(
    text: str, voice: str = "en-us", words_per_minute: int | None = None, pitch: int | None = None
) -> np.ndarray:
    """espeak-ng's speech of `text` as float64 mono at 16 kHz in [-1, 1] (polyphase resampling, scipy)."""
    from scipy.signal import resample_poly

    spoken, rate = espeak.speak(text, voice, words_per_minute, pitch)
    g = int(np.gcd(rate, SAMPLE_RATE))
    return resample_poly(spoken.astype(np.float64) / 32768.0, SAMPLE_RATE // g, rate // g)


def synthesize(text: str, voice: Voice, noise_seed: int | list[int]) -> np.ndarray:
    """Speak `text`: int16 mono at 16 kHz, speech scaled to `gain_db` RMS, white noise at `noise_db` RMS.

    The same arguments always give the same samples (in any thread or process).
    """
    x = speak_16k(text, voice.voice, voice.speed, voice.pitch)
    voiced = np.flatnonzero(np.abs(x) > 1e-3)
    if voiced.size == 0:
        raise OmniedgeError(
            f"espeak-ng produced silence for {text!r} ({voice.voice})", "check the espeakng-loader install"
        )
    pad = SAMPLE_RATE // 10  # keep 100 ms around the speech, drop espeak's longer trailing silence
    x = x[max(0, voiced[0] - pad) : voiced[-1] + pad]
    rms = float(np.sqrt(np.mean(x[np.abs(x) > 1e-3] ** 2)))
    x = x * (10 ** (voice.gain_db / 20) / rms)
    x = x + np.random.default_rng(noise_seed).normal(0.0, 10 ** (voice.noise_db / 20), x.shape)
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


_FE_LOCK = threading.Lock()


@functools.cache
def _feature_extractor_unlocked():  # type: ignore[no-untyped-def]
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=HOP, n_fft=400)


def _feature_extractor():  # type: ignore[no-untyped-def]
    with _FE_LOCK:  # the first call imports transformers, which is not safe from two threads at once
        return _feature_extractor_unlocked()


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel of int16 or float audio, unpadded: float16 [frames = len // 160, 128]."""
    x = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
    feats = _feature_extractor()(x, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np")
    return feats["input_features"][0].T.astype(np.float16)
