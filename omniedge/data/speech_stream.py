"""Speech made while training: espeak-ng (in process, omniedge.data.espeak) speaks a text with a random
training voice, then gain, reverberation and noise vary how it sounds. Fast enough to make fresh speech
for every step in the batch-making processes (about 10 ms per utterance on one core; docs/omni-mini.md).

Voices: the dataset's training variants plus the other installed espeak-ng variants that are neither a
validation/test variant, a near copy of one (iven2-4 of the test voice iven), nor an effect voice
(whisper, robots, echo). The held-out variants of omniedge.data.speech.VARIANTS["val"/"test"] never speak
here (tests check it), so the test voices stay unheard. Settings are drawn from ranges wider than the
dataset's, so the test's settings lie inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omniedge.data import speech

EXTRA_VARIANTS = (
    "Alicia", "Andrea", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Jacky",
    "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "Reed", "RicishayMax", "Storm", "adam", "anika",
    "aunty", "belinda", "benjamin", "boris", "caleb", "ed", "edward2", "grandma", "grandpa", "gustave",
    "ian", "kaukovalta", "klatt5", "klatt6", "m8", "marcelo", "miguel", "mike2", "pablo", "pedro",
    "sandro", "shelby", "steph2", "steph3", "zac",
)  # fmt: skip
STREAM_VARIANTS = tuple(dict.fromkeys((*speech.VARIANTS["train"], *EXTRA_VARIANTS)))
RANGES: dict[str, tuple[float, float]] = {
    "speed": (120, 230),  # words per minute (dataset train 130-210, test 140-200)
    "pitch": (10, 90),  # dataset train 20-80, test 25-75
    "gain_db": (-30, -12),  # speech RMS, dBFS
    "snr_db": (8, 50),  # test: 19-49 dB of white noise
}
REVERB_PROB = 0.3
RT60_S = (0.1, 0.5)
NOISE_COLOURS = ("white", "pink", "brown")


@dataclass(frozen=True)
class StreamVoice:
    """How one training utterance is spoken and degraded."""

    voice: str
    speed: int
    pitch: int
    gain_db: float
    snr_db: float
    noise: str  # white | pink | brown
    rt60_s: float  # 0: no reverberation


def sample_voice(rng: np.random.Generator) -> StreamVoice:
    accent = speech.ACCENTS[int(rng.integers(len(speech.ACCENTS)))]
    variant = STREAM_VARIANTS[int(rng.integers(len(STREAM_VARIANTS)))]
    r = RANGES
    return StreamVoice(
        voice=f"{accent}+{variant}",
        speed=int(rng.integers(r["speed"][0], r["speed"][1] + 1)),
        pitch=int(rng.integers(r["pitch"][0], r["pitch"][1] + 1)),
        gain_db=float(rng.uniform(*r["gain_db"])),
        snr_db=float(rng.uniform(*r["snr_db"])),
        noise=NOISE_COLOURS[int(rng.integers(len(NOISE_COLOURS)))],
        rt60_s=float(rng.uniform(*RT60_S)) if rng.random() < REVERB_PROB else 0.0,
    )


# IIR filters that shape white noise: Paul Kellet's economy pink (-3 dB/octave) and a leaky integrator
# (brown, -6 dB/octave); filtering costs a fraction of the FFT a spectral shaping would.
_SHAPE = {
    "pink": ([0.049922035, -0.095993537, 0.050612699, -0.004408786], [1, -2.494956002, 2.017265875, -0.522189400]),
    "brown": ([1.0], [1.0, -0.995]),
}  # fmt: skip


def coloured_noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise whose power falls as 1/f^0 (white), 1/f (pink) or 1/f^2 (brown)."""
    from scipy.signal import lfilter

    x = rng.standard_normal(n)
    if colour != "white" and n >= 4:
        b, a = _SHAPE[colour]
        x = lfilter(b, a, x)
        x -= x.mean()
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


def room_impulse(rt60_s: float, rng: np.random.Generator, rate: int = speech.SAMPLE_RATE) -> np.ndarray:
    """A synthetic room: the direct path, then exponentially decaying noise (60 dB down after rt60_s)."""
    n = max(2, int(rt60_s * rate))
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    tail[: int(0.002 * rate)] = 0.0  # first reflections arrive after ~2 ms
    h = 0.5 * tail / max(float(np.sqrt(np.sum(tail**2))), 1e-12)
    h[0] = 1.0
    return h


def degrade(x: np.ndarray, v: StreamVoice, rng: np.random.Generator) -> np.ndarray:
    """Reverberate, scale speech to gain_db RMS and add noise at snr_db: int16 as a recording would be."""
    from scipy.signal import fftconvolve

    if v.rt60_s > 0:
        x = fftconvolve(x, room_impulse(v.rt60_s, rng))[: len(x)]
    voiced = np.abs(x) > 1e-3 * max(float(np.abs(x).max()), 1e-12)
    rms = float(np.sqrt(np.mean(x[voiced] ** 2))) if voiced.any() else 1.0
    x = x * (10 ** (v.gain_db / 20) / max(rms, 1e-12))
    x = x + coloured_noise(len(x), v.noise, rng) * 10 ** ((v.gain_db - v.snr_db) / 20)
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def utterance(text: str, rng: np.random.Generator) -> tuple[np.ndarray, StreamVoice]:
    """`text` spoken by a random training voice: (int16 mono 16 kHz, how it was spoken)."""
    v = sample_voice(rng)
    x = speech.speak_16k(text, v.voice, v.speed, v.pitch)
    voiced = np.flatnonzero(np.abs(x) > 1e-3)
    if voiced.size:
        pad = int(rng.integers(speech.SAMPLE_RATE // 50, speech.SAMPLE_RATE // 5))  # 20-200 ms margins
        x = x[max(0, voiced[0] - pad) : voiced[-1] + pad]
    return degrade(x, v, rng), v
