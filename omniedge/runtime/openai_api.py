"""OpenAI-style chat requests in, `Omni.chat` arguments out; answers and stream chunks in OpenAI's shapes.

Accepted (POST /v1/chat/completions): `messages` with optional system/developer messages and one user
message whose `content` is a string or a list of parts:
  {"type": "text", "text": ...}
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "file:///abs/path" | "/abs/path"}}
  {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}      (OpenAI's shape)
  {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..." | "file:///abs/path"}}
At most one image and one audio clip; they are placed before the text, as in Qwen's chat examples.
Local paths are read only inside the directories the server was started with (`--media-root`).
Parameters: model, max_tokens / max_completion_tokens, temperature (default 0: greedy), top_p, top_k,
seed, stream, stream_options.include_usage; n must be 1. Anything malformed is an `ApiError` (a 4xx).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from omniedge.runtime.generate import GenerationResult

DEFAULT_MAX_TOKENS = 128
_IMAGE_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
                 "image/bmp": ".bmp", "image/gif": ".gif", "image/tiff": ".tiff"}  # fmt: skip
_AUDIO_SUFFIX = {"wav": ".wav", "x-wav": ".wav", "wave": ".wav", "flac": ".flac", "ogg": ".ogg", "mp3": ".mp3",
                 "mpeg": ".mp3"}  # fmt: skip


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Media:
    """An image or audio clip of a request: a file to read (a decoded data URL or an allowed local path)."""

    path: Path | None = None
    data: bytes | None = None
    suffix: str = ""


@dataclass
class ChatRequest:
    model: str
    prompt: str
    system: str | None
    image: Media | None
    audio: Media | None
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def kind(self) -> str:
        """text, image, audio or image+audio (the metrics label)."""
        parts = [k for k, v in (("image", self.image), ("audio", self.audio)) if v is not None]
        return "+".join(parts) or "text"


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param} is not valid base64 ({e})", param=param) from e


def _local(path_text: str, roots: tuple[Path, ...], param: str) -> Path:
    if not roots:
        raise ApiError(
            400,
            "local file paths are off on this server; send the file as a base64 data URL, or start the "
            "server with --media-root DIR",
            param=param,
        )
    p = Path(path_text).expanduser()
    if not p.is_absolute():
        raise ApiError(400, f"local path {path_text!r} must be absolute", param=param)
    real = p.resolve()
    if not any(real == r or r in real.parents for r in roots):
        raise ApiError(
            403,
            f"{path_text} is outside the server's media roots ({', '.join(map(str, roots))})",
            param=param,
        )
    if not real.is_file():
        raise ApiError(400, f"file not found: {path_text}", param=param)
    return real


def _url_media(url: Any, kind: str, roots: tuple[Path, ...], param: str) -> Media:
    """A data URL, a file:// URL or an absolute path; remote URLs are refused (the device is offline)."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{param} must be a non-empty string", param=param)
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{param}: a data URL must be data:<type>;base64,<data>", param=param)
        mime = head[5:-7].lower()
        if not mime.startswith(kind + "/"):
            raise ApiError(400, f"{param}: expected {kind}/* data, got {mime or 'no type'}", param=param)
        table = _IMAGE_SUFFIX if kind == "image" else {f"audio/{k}": v for k, v in _AUDIO_SUFFIX.items()}
        return Media(data=_b64(payload, param), suffix=table.get(mime, ""))
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        raise ApiError(400, f"{param}: remote URLs are not fetched; send a base64 data URL", param=param)
    if scheme == "file":
        return Media(path=_local(unquote(urlparse(url).path), roots, param))
    if scheme:
        raise ApiError(400, f"{param}: unsupported URL scheme {scheme!r}", param=param)
    return Media(path=_local(url, roots, param))


def _part_media(part: dict[str, Any], i: int, roots: tuple[Path, ...]) -> tuple[str, Media]:
    kind = part.get("type")
    where = f"messages[-1].content[{i}]"
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return "image", _url_media(url, "image", roots, f"{where}.image_url.url")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise ApiError(400, f"{where}.input_audio must be {{data: base64, format}}", param=where)
        fmt = str(spec.get("format") or "wav").lower()
        if fmt not in _AUDIO_SUFFIX:
            raise ApiError(400, f"audio format {fmt!r} is not supported (wav, flac, ogg)", param=where)
        return "audio", Media(data=_b64(spec["data"], f"{where}.input_audio.data"), suffix=_AUDIO_SUFFIX[fmt])
    if kind == "audio_url":
        spec = part.get("audio_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return "audio", _url_media(url, "audio", roots, f"{where}.audio_url.url")
    raise ApiError(
        400, f"{where} has unsupported type {kind!r} (text, image_url, input_audio, audio_url)", param=where
    )


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts", param=where)


def _user_turn(content: Any, roots: tuple[Path, ...]) -> tuple[str, Media | None, Media | None]:
    if isinstance(content, str):
        return content, None, None
    if not isinstance(content, list) or not content:
        raise ApiError(400, "the user message's content must be a string or a non-empty list of parts",
                       param="messages[-1].content")  # fmt: skip
    texts: list[str] = []
    media: dict[str, Media] = {}
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ApiError(400, f"messages[-1].content[{i}] must be an object", param="messages")
        if part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[-1].content[{i}].text must be a string", param="messages")
            texts.append(part["text"])
            continue
        kind, m = _part_media(part, i, roots)
        if kind in media:
            raise ApiError(400, f"one {kind} per request is supported; this one has more", param="messages")
        media[kind] = m
    return "".join(texts), media.get("image"), media.get("audio")


def _number(body: dict[str, Any], key: str, default: float, kind: type = float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and value != int(value))
    ):
        raise ApiError(400, f"{key} must be a{'n integer' if kind is int else ' number'}", param=key)
    return kind(value)


def parse_chat_request(body: Any, served_model: str, roots: tuple[Path, ...] = ()) -> ChatRequest:
    """Validate an OpenAI chat body; ApiError (400/403/404) for anything this server cannot answer."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (GET /v1/models lists it)", param="model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model!r}",
                       param="model", code="model_not_found")  # fmt: skip
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system_parts, users = [], []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            system_parts.append(_text_of(msg.get("content"), f"messages[{i}].content"))
        elif role == "user":
            users.append(i)
        else:
            raise ApiError(
                400,
                f"messages[{i}] has role {role!r}: this server answers one user turn (plus system messages); "
                "earlier assistant turns are not supported yet",
                param="messages",
            )
    if users != [len(messages) - 1]:
        raise ApiError(400, "exactly one user message is supported, and it must come last", param="messages")
    prompt, image, audio = _user_turn(messages[-1].get("content"), roots)
    if _number(body, "n", 1, int) != 1:
        raise ApiError(400, "n must be 1", param="n")
    if body.get("stop") not in (None, [], ""):
        raise ApiError(400, "stop sequences are not supported yet", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = _number({"max_tokens": max_tokens}, "max_tokens", DEFAULT_MAX_TOKENS, int)
    if max_new < 1:
        raise ApiError(400, "max_tokens must be >= 1", param="max_tokens")
    opts = body.get("stream_options") or {}
    return ChatRequest(
        model=model,
        prompt=prompt,
        system="\n".join(system_parts) or None,
        image=image,
        audio=audio,
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", 0.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_number(body, "top_k", 0, int),
        seed=_number(body, "seed", 0, int),
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
    )


# ---------------------------------------------------------------- responses


def _usage(result: GenerationResult) -> dict[str, int]:
    p, c = result.timings.prompt_tokens, len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(result: GenerationResult) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def completion(req: ChatRequest, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": req.created,
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": _finish(result),
            }
        ],
        "usage": _usage(result),
    }


def chunk(req: ChatRequest, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": req.id,
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": req.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def final_chunks(req: ChatRequest, result: GenerationResult) -> list[dict[str, Any]]:
    out = [chunk(req, {}, _finish(result))]
    if req.include_usage:
        out.append({**chunk(req, {}), "choices": [], "usage": _usage(result)})
    return out
