"""espeak-ng inside this process, from the PyPI wheel `espeakng-loader` (libespeak-ng 1.52 and its voice
data; links only libstdc++/libm/libc): no apt package, no audio device, no subprocess per utterance.

Deterministic: libespeak-ng seeds its noise generator from the clock and keeps pitch-flutter and
wave-phase counters in static variables that no API call resets, so an utterance would depend on what
was spoken before it. Each call therefore loads the library afresh (dlopen), seeds it, speaks and
unloads it (dlclose): the samples depend only on (text, voice, speed, pitch). That costs about 1 ms.

Thread- and process-safe: the library keeps global state, so one lock serialises every use in a
process; a fork waits for that lock (os.register_at_fork), so a child never inherits a half-spoken
utterance. Processes each load their own copy, so a process pool scales with cores.
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import cache
from pathlib import Path

import numpy as np

from omniedge.errors import OmniedgeError

INSTALL_FIX = 'pip install espeakng-loader   (it comes with pip install -e ".[offline]")'
SEED = 1  # espeak-ng's own `-D` (deterministic) mode seeds with 1 too
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: synthesise in the calling thread, into the callback
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_EE_OK = 0
# int callback(short *wav, int numsamples, espeak_EVENT *events): return 0 to go on
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _VoiceSpec(ctypes.Structure):  # espeak_VOICE
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_LOCK.acquire, after_in_parent=_LOCK.release, after_in_child=_LOCK.release)


def _loader():  # type: ignore[no-untyped-def]
    try:
        import espeakng_loader
    except ImportError as e:
        raise OmniedgeError(
            "espeak-ng is not installed: speech is synthesised by the espeakng-loader wheel", INSTALL_FIX
        ) from e
    return espeakng_loader


def data_path() -> Path:
    """The espeak-ng-data directory the wheel ships (voices, variants, dictionaries)."""
    return Path(_loader().get_data_path())


@cache
def available() -> bool:
    """True when the wheel is installed and its library speaks (asked once per process)."""
    try:
        speak("ok")
    except OmniedgeError:
        return False
    return True


def variants() -> frozenset[str]:
    """Names of the voice variants (`m3`, `klatt`, `Alex`, ...) the installed espeak-ng data provides."""
    return _variants_in(data_path())


@cache
def _variants_in(data: Path) -> frozenset[str]:
    folder = data / "voices" / "!v"
    return frozenset(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else frozenset()


@cache
def version() -> str:
    """libespeak-ng's version string (`1.52.0 ...`)."""
    with _LOCK:
        lib = _open(_loader().get_library_path())
        try:
            lib.espeak_Info.restype = ctypes.c_char_p
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            return (lib.espeak_Info(None) or b"").decode(errors="replace")
        finally:
            _unload(lib)


def _open(path: str) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise OmniedgeError(f"cannot load libespeak-ng from espeakng-loader: {e}", INSTALL_FIX) from e
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_VoiceSpec)]
    lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_VoiceSpec)
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return lib


def _set_voice(lib: ctypes.CDLL, voice: str) -> None:
    """As the espeak-ng command does for -v: a voice file name (`en-us+m3`), else a language (`en-gb`),
    whose voice then takes the variant (`en-gb+m3` -> gmw/en+m3)."""
    language, _, variant = voice.partition("+")
    if variant and variant not in variants():
        raise OmniedgeError(
            f"espeak-ng has no voice variant {variant!r} (in {voice!r})",
            f"use one of {data_path() / 'voices' / '!v'}, e.g. m3, f2, klatt",
        )
    if lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
        return
    spec = _VoiceSpec(languages=language.encode())
    if lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) != _EE_OK:
        raise OmniedgeError(
            f"espeak-ng has no voice {voice!r}",
            "name a language and optionally a variant, e.g. en-us, en-gb+m3",
        )
    if variant:
        identifier = lib.espeak_GetCurrentVoice().contents.identifier
        if lib.espeak_SetVoiceByName(identifier + b"+" + variant.encode()) != _EE_OK:
            raise OmniedgeError(f"espeak-ng cannot load voice {voice!r}", INSTALL_FIX)


def _speak_fresh(
    text: str, voice: str, words_per_minute: int | None, pitch: int | None
) -> tuple[np.ndarray, int]:
    loader = _loader()
    chunks: list[np.ndarray] = []

    def collect(wav: ctypes._Pointer, n: int, _events: int) -> int:  # type: ignore[type-arg]
        if wav and n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    callback = _SYNTH_CALLBACK(collect)
    lib = _open(loader.get_library_path())
    rate = 0
    try:
        rate = int(lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, loader.get_data_path().encode(), 0))
        if rate <= 0:
            raise OmniedgeError(
                f"libespeak-ng failed to initialise (returned {rate}) with data {loader.get_data_path()}",
                "reinstall it: pip install --force-reinstall espeakng-loader",
            )
        lib.espeak_SetSynthCallback(callback)
        lib.espeak_ng_SetRandSeed(SEED)
        _set_voice(lib, voice)
        if words_per_minute is not None:
            lib.espeak_SetParameter(_RATE, int(words_per_minute), 0)
        if pitch is not None:
            lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        raw = text.encode("utf-8")
        err = lib.espeak_Synth(raw, len(raw) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise OmniedgeError(f"espeak-ng failed on {text!r} with voice {voice} (error {err})", INSTALL_FIX)
    finally:
        if rate > 0:
            lib.espeak_Terminate()
        _unload(lib)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)), rate


def _unload(lib: ctypes.CDLL) -> None:
    import _ctypes

    _ctypes.dlclose(lib._handle)


def speak(
    text: str, voice: str = "en-us", words_per_minute: int | None = None, pitch: int | None = None
) -> tuple[np.ndarray, int]:
    """(int16 mono samples, sample rate) of `text` spoken by espeak-ng `voice` (`<language>[+<variant>]`).

    `words_per_minute` and `pitch` (0-99) are espeak-ng's -s and -p; None keeps the voice's default.
    The same arguments always give the same samples.
    """
    with _LOCK:
        return _speak_fresh(text, voice, words_per_minute, pitch)
