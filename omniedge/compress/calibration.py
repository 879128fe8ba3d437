"""Calibration: run the teacher thinker over real multimodal requests and count which experts each router picks.

Requests come from a pluggable source (`register_source`): built-in texts plus images and audio made in
code for now; the real-data builders (issue 3) register another source later. Counts are kept per layer
and per modality (text / image / audio token positions) so pruning can protect experts that only image
or audio tokens use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omniedge.errors import OmniedgeError
from omniedge.models.family import SPECIAL_TOKENS, moe_blocks, thinker_parts

MODALITIES = ("text", "image", "audio")
TEXT, IMAGE, AUDIO = 0, 1, 2
SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Request:
    """One user turn (text, optional image HxWx3 uint8, optional 16 kHz mono float32 audio) and a reply."""

    prompt: str
    reply: str = ""
    image: np.ndarray | None = None
    audio: np.ndarray | None = None

    @property
    def kind(self) -> str:
        parts = [m for m, x in (("image", self.image), ("audio", self.audio)) if x is not None]
        return "+".join(parts) or "text"


# A source makes `n` requests of one modality ("text", "image", "audio") from the calibration settings.
Source = Callable[[str, int, dict[str, Any], np.random.Generator], list[Request]]
_SOURCES: dict[str, Source] = {}


def register_source(name: str, fn: Source) -> None:
    """Make a request source selectable as `calibration.source: <name>` in a recipe."""
    _SOURCES[name] = fn


def get_source(name: str) -> Source:
    if name not in _SOURCES:
        raise OmniedgeError(
            f"unknown calibration source {name!r}", f"use one of {sorted(_SOURCES)} in calibration.source"
        )
    return _SOURCES[name]


# ---------------------------------------------------------------- built-in data

# Passages for calibration: varied topics and registers, two in Chinese (Qwen3-Omni is multilingual).
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
    from omniedge.data import espeak

    return espeak.available()


def synth_speech(text: str, voice: str = "en") -> np.ndarray | None:
    """English speech for `text`, float32 16 kHz mono (espeak-ng in process); None when it is not installed."""
    from omniedge.data import speech

    if not espeak_available():
        return None
    return speech.speak_16k(text, voice).astype(np.float32)


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


def builtin_requests(kind: str, n: int, settings: dict[str, Any], rng: np.random.Generator) -> list[Request]:
    """Requests made in code: text continuations, pictures of shapes, spoken questions or tones."""
    out: list[Request] = []
    for i in range(n):
        if kind == "text":
            passage = CALIBRATION_TEXTS[i % len(CALIBRATION_TEXTS)]
            start, rest = _continuation(passage, rng)
            out.append(Request(f"Continue this text: {start}", rest))
        elif kind == "image":
            img, desc = render_shapes(int(settings["image_size"]), rng)
            out.append(Request(_IMAGE_QUESTIONS[i % len(_IMAGE_QUESTIONS)], desc, image=img))
        elif kind == "audio":
            question, answer = SPOKEN[i % len(SPOKEN)]
            speech = synth_speech(question)
            if speech is not None:
                speech = speech[: 30 * SAMPLE_RATE]  # Whisper features cover at most 30 s
                out.append(Request("Answer the question in the recording.", answer, audio=speech))
            else:
                tone, desc = synth_tone(float(settings["audio_seconds"]), rng)
                out.append(Request("What do you hear?", desc, audio=tone))
        else:
            raise OmniedgeError(f"unknown modality {kind!r}", f"use one of {list(MODALITIES)}")
    return out


register_source("builtin", builtin_requests)


def heldout_texts(n: int) -> list[str]:
    """Up to `n` texts never used for calibration, for measuring quality (no repeats)."""
    return list(HELDOUT_TEXTS[:n])


def modality_counts(samples: int, mix: dict[str, float]) -> dict[str, int]:
    """Split `samples` over modalities by the recipe's mix (largest remainder, every share > 0 gets >= 1)."""
    total = sum(mix.values())
    want = {m: samples * mix.get(m, 0.0) / total for m in MODALITIES}
    counts = {m: int(want[m]) for m in MODALITIES}
    for m in sorted(MODALITIES, key=lambda m: want[m] - counts[m], reverse=True):
        if sum(counts.values()) >= samples:
            break
        counts[m] += 1
    for m in MODALITIES:
        if mix.get(m, 0.0) > 0 and counts[m] == 0:
            counts[m] = 1
    return counts


# ---------------------------------------------------------------- preprocessing
# The runtime's numpy preprocessing (parity-tested against transformers), so calibration sees exactly the
# features the device will compute.


def audio_features(audio: np.ndarray, n_mels: int, n_window: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_features [1, n_mels, T], feature_attention_mask [1, T], number of <|audio_pad|> tokens)."""
    from omniedge.runtime.preprocess import log_mel, num_audio_tokens

    mel = log_mel(np.asarray(audio, dtype=np.float32), n_mels=n_mels)
    frames = mel.shape[1]
    mask = torch.ones(1, frames, dtype=torch.long)
    return torch.from_numpy(mel)[None], mask, num_audio_tokens(frames, n_window)


def image_features(
    image: np.ndarray, patch: int, temporal: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw [1, 3]) of an HxWx3 uint8 image resized to the nearest multiple of
    patch*merge (bicubic; a no-op for the built-in images, which are drawn at that size)."""
    from omniedge.runtime.preprocess import image_inputs

    unit = patch * merge
    h, w = image.shape[:2]
    size = (max(unit, round(h / unit) * unit), max(unit, round(w / unit) * unit))
    pixels, grid = image_inputs(image, size, patch, temporal, merge)
    return torch.from_numpy(pixels), torch.tensor([list(grid)])


# ---------------------------------------------------------------- encoding in the chat format


@dataclass
class Encoded:
    """Thinker forward kwargs for one request and the modality of every token position."""

    inputs: dict[str, torch.Tensor]
    modality: torch.Tensor  # [seq] int64, TEXT / IMAGE / AUDIO
    kind: str


def _special_ids(tokenizer: Any, cfg: Any) -> dict[str, int]:
    ids: dict[str, int] = {}
    for name, text in SPECIAL_TOKENS.items():
        i = tokenizer.token_to_id(text)
        if i is None:
            raise OmniedgeError(
                f"the tokenizer has no {text} token", "use the checkpoint's own tokenizer.json"
            )
        ids[name] = i
    for name, attr in (("image_pad", "image_token_id"), ("audio_pad", "audio_token_id")):
        if getattr(cfg, attr, ids[name]) != ids[name]:
            raise OmniedgeError(
                f"tokenizer.json and config.json disagree on {SPECIAL_TOKENS[name]} "
                f"({ids[name]} vs {getattr(cfg, attr)})",
                "use the tokenizer that belongs to this checkpoint",
            )
    return ids


def encode_request(req: Request, tokenizer: Any, model: Any, max_tokens: int) -> Encoded:
    """Qwen3-Omni chat format: <|im_start|>user\\n[image][audio]text<|im_end|>\\n<|im_start|>assistant\\nreply."""
    tcfg = thinker_parts(model).thinker.config
    sp = _special_ids(tokenizer, tcfg)
    ids: list[int] = []
    mod: list[int] = []
    inputs: dict[str, torch.Tensor] = {}

    def text(s: str) -> None:
        t = tokenizer.encode(s, add_special_tokens=False).ids
        ids.extend(t)
        mod.extend([TEXT] * len(t))

    def special(name: str, n: int = 1, modality: int = TEXT) -> None:
        ids.extend([sp[name]] * n)
        mod.extend([modality] * n)

    special("im_start")
    text("user\n")
    if req.image is not None:
        v = tcfg.vision_config
        pixels, grid = image_features(req.image, v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        inputs.update(pixel_values=pixels, image_grid_thw=grid)
        special("vision_start")
        special("image_pad", int(grid.prod()) // v.spatial_merge_size**2, IMAGE)
        special("vision_end")
    if req.audio is not None:
        a = tcfg.audio_config
        feats, mask, n_audio = audio_features(req.audio, a.num_mel_bins, a.n_window)
        inputs.update(input_features=feats, feature_attention_mask=mask)
        special("audio_start")
        special("audio_pad", n_audio, AUDIO)
        special("audio_end")
    text(req.prompt)
    special("im_end")
    text("\n")
    special("im_start")
    text("assistant\n")
    if req.reply:
        text(req.reply)
        special("im_end")
    # Truncate at the token budget, but never inside an image or audio span (its features must all fit).
    last_media = max((i for i, m in enumerate(mod) if m != TEXT), default=-1)
    keep = max(max_tokens, last_media + 2)
    ids, mod = ids[:keep], mod[:keep]
    input_ids = torch.tensor([ids])
    inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return Encoded(inputs, torch.tensor(mod), req.kind)


# ---------------------------------------------------------------- router statistics


@dataclass
class RouterStats:
    """Per MoE layer and modality: how often each expert was in the top-k, and its summed router weight."""

    layers: list[int]
    num_experts: int
    top_k: int
    counts: torch.Tensor  # [L, 3, E] int64
    weights: torch.Tensor  # [L, 3, E] float64
    tokens: torch.Tensor = field(
        default_factory=lambda: torch.zeros(3, dtype=torch.int64)
    )  # positions per modality

    @classmethod
    def empty(cls, layers: Sequence[int], num_experts: int, top_k: int) -> RouterStats:
        n = len(layers)
        return cls(
            list(layers),
            num_experts,
            top_k,
            torch.zeros(n, 3, num_experts, dtype=torch.int64),
            torch.zeros(n, 3, num_experts, dtype=torch.float64),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("layers", "num_experts", "top_k", "counts", "weights", "tokens")
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterStats:
        return cls(**d)


def _router_outputs(out: Any, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k indices) from a router's output: transformers' (logits, scores, indices) tuple,
    or bare logits (then softmax + top-k + renormalise, as Qwen3-Omni's router does)."""
    if isinstance(out, tuple) and len(out) >= 3:
        return out[1], out[2]
    logits = out[0] if isinstance(out, tuple) else out
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), idx


def collect_router_stats(model: Any, encoded: Sequence[Encoded], progress: bool = True) -> RouterStats:
    """Forward every request through the thinker (no grad) with a hook on every router, and count."""
    from tqdm.auto import tqdm

    blocks = moe_blocks(model)
    if not blocks:
        raise OmniedgeError("the model has no MoE layers to calibrate", "pass a Qwen3-Omni MoE checkpoint")
    tcfg = thinker_parts(model).text_model.config
    n_exp, top_k = int(tcfg.num_experts), int(tcfg.num_experts_per_tok)
    stats = RouterStats.empty([i for i, _ in blocks], n_exp, top_k)
    current: dict[str, torch.Tensor] = {}

    def hook(slot: int) -> Callable[..., None]:
        def fn(_module: Any, _inputs: Any, out: Any) -> None:
            w, idx = _router_outputs(out, top_k)
            mod = current["modality"].to(idx.device)
            if idx.shape[0] != mod.shape[0]:
                raise RuntimeError(f"router saw {idx.shape[0]} tokens, expected {mod.shape[0]}")
            flat = (mod[:, None] * n_exp + idx).reshape(-1)
            stats.counts[slot] += torch.bincount(flat, minlength=3 * n_exp).view(3, n_exp).cpu()
            wsum = torch.zeros(3 * n_exp, dtype=torch.float64, device=idx.device)
            wsum.index_add_(0, flat, w.reshape(-1).double())
            stats.weights[slot] += wsum.view(3, n_exp).cpu()

        return fn

    handles = [block.gate.register_forward_hook(hook(slot)) for slot, (_, block) in enumerate(blocks)]
    thinker = thinker_parts(model).thinker
    device = next(thinker.parameters()).device
    try:
        with torch.inference_mode():
            for enc in tqdm(encoded, desc="calibrating", unit="req", disable=not progress):
                current["modality"] = enc.modality
                kwargs = {k: v.to(device) for k, v in enc.inputs.items()}
                thinker(**kwargs, use_cache=False)
                stats.tokens += torch.bincount(enc.modality, minlength=3)
    finally:
        for h in handles:
            h.remove()
    return stats


def build_requests(settings: dict[str, Any]) -> list[Request]:
    """The calibration requests the recipe asks for, deterministic for its seed."""
    rng = np.random.default_rng(settings["seed"])
    source = get_source(settings["source"])
    out: list[Request] = []
    for kind, n in modality_counts(settings["samples"], settings["mix"]).items():
        if n:
            out.extend(source(kind, n, settings, rng))
    return out


def describe(settings: dict[str, Any], encoded: Sequence[Encoded], stats: RouterStats) -> dict[str, Any]:
    """What the calibration data was, for omniedge.json."""
    kinds: dict[str, int] = {}
    for e in encoded:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    audio = "espeak-ng speech" if espeak_available() else "synthetic tones"
    return {
        "source": settings["source"],
        "seed": settings["seed"],
        "requests": len(encoded),
        "requests_by_kind": kinds,
        "tokens": {m: int(stats.tokens[i]) for i, m in enumerate(MODALITIES)},
        "max_tokens": settings["max_tokens"],
        "image_size": settings["image_size"],
        "audio": audio if settings["source"] == "builtin" else settings["source"],
        "preprocessing": "omniedge.runtime.preprocess (Whisper log-mel, Qwen2-VL patchify)",
        "settings": settings,
    }


def calibrate(
    model: Any, tokenizer: Any, settings: dict[str, Any], progress: bool = True
) -> tuple[RouterStats, dict[str, Any]]:
    """Router statistics of the teacher over the recipe's calibration requests, and their description."""
    encoded = [encode_request(r, tokenizer, model, settings["max_tokens"]) for r in build_requests(settings)]
    stats = collect_router_stats(model, encoded, progress=progress)
    return stats, describe(settings, encoded, stats)
