"""Built-in calibration data made in code: short passages, pictures of coloured shapes, spoken questions
(espeak-ng when installed) or tones. The toy source (`calibration.source: builtin`) for tiny models and tests;
real models calibrate on the calibration pack (omniedge.compress.calibration_pack).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from typing import Any

import numpy as np

from omniedge.compress.calibration import SAMPLE_RATE, Request, register_source
from omniedge.errors import OmniedgeError

CALIBRATION_TEXTS: tuple[str, ...] = (
    "The robot arm paused above the conveyor. Its camera found a dented can among the rows of bottles. "
    "With a soft hiss the gripper closed, lifted the can and dropped it into the reject bin.",
    "To make a simple tomato soup, soften an onion in olive oil, add two cans of tomatoes and a cup of "
    "stock, and simmer for twenty minutes. Blend until smooth and season with salt and pepper.",
    "In 1969 the Apollo 11 lander touched down on the Sea of Tranquility. Neil Armstrong stepped onto "
    "the surface a few hours later, and about six hundred million people watched on television.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The light reactions "
    "happen in the thylakoid membranes, while the Calvin cycle fixes carbon in the stroma.",
    "Please restart the kiosk before nine o'clock tomorrow. If the screen stays black, hold the power "
    "button for ten seconds, wait for the fan to stop, and press it again.",
    "def mean(values):\n    if not values:\n        raise ValueError('empty input')\n"
    "    return sum(values) / len(values)\n\nprint(mean([3, 4, 5]))",
    "Visitor: Where is the train station? Guide: Walk two blocks north, turn left at the bakery, and you "
    "will see the clock tower. The platform for the airport line is on the lower level.",
    "The quarterly report shows revenue of 4.2 million euros, up 12 percent, while costs rose by only "
    "5 percent. Most of the growth came from service contracts in the northern region.",
    "A gentle rain fell on the harbour. Fishing boats rocked at their moorings, gulls argued over scraps, "
    "and the smell of salt and diesel drifted up the narrow streets to the market square.",
    "Ohm's law states that the current through a conductor is proportional to the voltage across it. "
    "A 12 volt battery across a 4 ohm resistor therefore drives a current of 3 amperes.",
    "Warning: the battery temperature is above 60 degrees. Stop charging, move the robot to a cool place "
    "and let it rest for thirty minutes before you try again.",
    "Mix 250 grams of flour, a pinch of salt and 7 grams of dry yeast. Add warm water until the dough is "
    "soft, knead for ten minutes, and let it rise in a warm place for one hour.",
    "The cat jumped onto the windowsill, stared at a sparrow on the fence, and flicked its tail. When the "
    "bird flew off, the cat yawned, curled up in the sun and fell asleep.",
    "Knowledge distillation trains a small student network to match the softened output distribution of "
    "a large teacher. A temperature above one spreads probability mass over more classes.",
    "今天天气很好，我们去公园散步吧。公园里有很多花，孩子们在草地上玩耍，老人们在树下下棋。",
    "机器人看到桌子上有一个红色的杯子和一个蓝色的盒子。它先拿起杯子，然后把盒子推到桌子的另一边。",
    "Customer: My order number is 58213 and the parcel has not arrived. Agent: I am sorry to hear that. "
    "The tracking shows it left the depot on Monday; it should reach you within two days.",
    "Glaciers form where more snow falls in winter than melts in summer. Over centuries the snow is "
    "compressed into ice that flows slowly downhill under its own weight, carving deep valleys.",
    "Step 1: unplug the printer. Step 2: open the front cover and remove the jammed paper gently. "
    "Step 3: close the cover, plug the printer back in and print a test page.",
    "The orchestra tuned to the oboe's A. Then the hall fell silent, the conductor raised her baton, and "
    "the first quiet notes of the violins rose like mist over a lake.",
    "Prime numbers have exactly two divisors. The first ten primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 "
    "and 29, and there are infinitely many of them, as Euclid proved.",
    "Good morning! Today's schedule: a team meeting at ten, lunch with the suppliers at half past twelve, "
    "and a safety inspection of the warehouse at three in the afternoon.",
    "A transformer layer mixes information across positions with attention and then transforms each "
    "position with a feed-forward network. A mixture of experts replaces that network with many.",
    "The old lighthouse keeper climbed the spiral stairs every evening. He cleaned the lens, trimmed the "
    "wick and watched the beam sweep across the dark water until dawn.",
)

# Held out: never used for calibration, only to measure quality after each stage.
HELDOUT_TEXTS: tuple[str, ...] = (
    "The delivery drone circled the rooftop twice before it landed on the marked pad. A small door "
    "opened, a parcel slid out, and the drone lifted off again toward the depot.",
    "Boil the pasta in plenty of salted water. Meanwhile fry garlic in butter, add spinach and cream, "
    "and stir in grated cheese. Drain the pasta and toss it with the sauce.",
    "The French Revolution began in 1789 with the storming of the Bastille. Within a few years the "
    "monarchy was abolished and France was declared a republic.",
    "Sound travels at about 343 metres per second in air at room temperature, more than four times "
    "faster in water, and faster still in steel.",
    "User: Can you turn on the lights in the kitchen? Assistant: Sure, the kitchen lights are now on. "
    "Would you like me to set them to a warmer colour for the evening?",
    "Our team found that the sensor drift grew with temperature. After adding a calibration step at "
    "startup, the error fell from 3 percent to less than half a percent.",
    "小猫坐在窗台上，看着外面的雨。雨停了以后，天空出现了一道美丽的彩虹。",
    "The museum's new wing holds paintings from the seventeenth century, a collection of clocks, and a "
    "room of maps that show how the coastline has changed over four hundred years.",
    "Wind turbines turn the kinetic energy of moving air into electricity. Their output grows with the "
    "cube of the wind speed, so a small increase in wind gives much more power.",
    "Before you leave, check that the windows are closed, the oven is off, and the back door is locked. "
    "Then set the alarm and take the spare key with you.",
)

# Spoken questions (synthesised with espeak-ng when it is installed) and the replies a good model gives.
SPOKEN: tuple[tuple[str, str], ...] = (
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Please turn left at the next corner.", "Turning left at the next corner."),
    (
        "What time does the museum open?",
        "I do not know the museum's hours; please check the sign at the door.",
    ),
    ("Can you bring me a glass of water?", "Yes, I will bring you a glass of water."),
    ("Where did I leave my keys?", "I saw keys on the table near the front door."),
    ("Is it going to rain tomorrow?", "I cannot see a forecast, but the sky looks cloudy."),
    ("Stop the conveyor belt now.", "The conveyor belt is stopping."),
)

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle")


def render_shapes(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A size x size RGB image of 1-4 coloured shapes on a light background, and a description of it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(200, 250, size=3)
    img += rng.normal(0, 3, size=img.shape)  # a little sensor noise
    names: list[str] = []
    for _ in range(int(rng.integers(1, 5))):
        colour = str(rng.choice(list(_COLOURS)))
        shape = str(rng.choice(_SHAPES))
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        r = rng.uniform(0.08, 0.2) * size
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif shape == "square":
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:  # upward triangle: inside when below the apex and within the widening edges
            mask = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        img[mask] = _COLOURS[colour]
        vert = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else "middle"
        horiz = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else "centre"
        names.append(f"a {colour} {shape} at the {vert} {horiz}")
    desc = ("I see " + ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1] + ".").replace(
        "middle centre", "centre"
    )
    return np.clip(img, 0, 255).astype(np.uint8), desc


def synth_tone(seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A chirp or a sequence of beeps at 16 kHz, with noise, and what a listener would say about it."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    if rng.random() < 0.5:
        f0, f1 = sorted(rng.uniform(150, 3000, size=2))
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
        x = np.sin(phase) + 0.3 * np.sin(2 * phase)
        desc = f"A tone that {'rises' if f1 > f0 else 'falls'} from about {f0:.0f} Hz to {f1:.0f} Hz."
    else:
        n = int(rng.integers(2, 6))
        freqs = rng.uniform(300, 1500, size=n)
        seg = len(t) // n
        x = np.zeros_like(t)
        for i, f in enumerate(freqs):
            on = slice(i * seg, i * seg + int(seg * 0.6))
            x[on] = np.sin(2 * np.pi * f * t[on])
        desc = f"{n} short beeps."
    x = 0.4 * x / max(1e-9, np.abs(x).max()) + rng.normal(0, 0.01, size=x.shape)
    return x.astype(np.float32), desc


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synth_speech(text: str, voice: str = "en") -> np.ndarray | None:
    """English speech for `text` at 16 kHz via the espeak-ng binary; None when it is missing or fails."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    try:
        wav = subprocess.run(
            [exe, "-v", voice, "--stdout", text], capture_output=True, check=True, timeout=30
        )
    except (subprocess.SubprocessError, OSError):
        return None
    with wave.open(io.BytesIO(wav.stdout)) as w:
        rate, width = w.getframerate(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        return None
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return resample(x, rate, SAMPLE_RATE)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by truncating or zero-padding the spectrum (enough for calibration audio)."""
    if src == dst or len(x) == 0:
        return x.astype(np.float32)
    n_out = round(len(x) * dst / src)
    spec = np.fft.rfft(x)
    spec = spec[: n_out // 2 + 1] if n_out < len(x) else np.pad(spec, (0, n_out // 2 + 1 - len(spec)))
    return (np.fft.irfft(spec, n_out) * (n_out / len(x))).astype(np.float32)


def _continuation(text: str, rng: np.random.Generator) -> tuple[str, str]:
    """Split a passage at a word boundary near its middle: the user gives the start, the reply continues."""
    words = text.split(" ")
    if len(words) < 4:
        return text, ""
    cut = int(rng.integers(max(1, len(words) // 3), max(2, 2 * len(words) // 3)))
    return " ".join(words[:cut]), " ".join(words[cut:])


_IMAGE_QUESTIONS = (
    "What shapes do you see in this picture?",
    "Describe the image.",
    "List the coloured shapes and where they are.",
)


def builtin_requests(
    kind: str, n: int, settings: dict[str, Any], rng: np.random.Generator, split: str = "calibration"
) -> list[Request]:
    """Requests made in code: text continuations, pictures of shapes, spoken questions or tones. The
    held-out split uses texts never used for calibration; its pictures and sounds come from `rng`."""
    out: list[Request] = []
    texts = HELDOUT_TEXTS if split == "heldout" else CALIBRATION_TEXTS
    spoken = SPOKEN[::-1] if split == "heldout" else SPOKEN
    for i in range(n):
        if kind == "text":
            if split == "heldout":  # the whole passage is the reply: every token is measured
                out.append(Request("", texts[i % len(texts)]))
                continue
            start, rest = _continuation(texts[i % len(texts)], rng)
            out.append(Request(f"Continue this text: {start}", rest))
        elif kind == "image":
            img, desc = render_shapes(int(settings["image_size"]), rng)
            out.append(Request(_IMAGE_QUESTIONS[i % len(_IMAGE_QUESTIONS)], desc, image=img))
        elif kind == "audio":
            question, answer = spoken[i % len(spoken)]
            speech = synth_speech(question)
            if speech is not None:
                speech = speech[: 30 * SAMPLE_RATE]  # Whisper features cover at most 30 s
                out.append(Request("Answer the question in the recording.", answer, audio=speech))
            else:
                tone, desc = synth_tone(float(settings["audio_seconds"]), rng)
                out.append(Request("What do you hear?", desc, audio=tone))
        else:
            raise OmniedgeError(
                f"the builtin calibration source has no {kind} requests",
                f"set calibration.mix {kind} to 0, or use source omni-mini-data",
            )
    return out


register_source("builtin", builtin_requests)
