"""`omniedge serve`: a local OpenAI-style HTTP server (Starlette on uvicorn) in front of one `Omni`.

    POST /v1/chat/completions   text, image and audio parts; `"stream": true` for server-sent events
    GET  /v1/models             the one model served
    GET  /health                liveness, queue, memory against the budget
    GET  /metrics               Prometheus text

Requests run one at a time through Omni's bounded queue (a full queue answers 429). Every refusal is a
JSON error in OpenAI's shape with a 4xx status, and the server keeps serving: errors found before the
first token (bad media, a prompt past the context, ...) come back as the status of the response itself,
even when streaming. Bound to 127.0.0.1 unless told otherwise; bodies above `max_request_bytes` get 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omniedge.errors import OmniedgeError
from omniedge.runtime.admission import QueueFullError
from omniedge.runtime.metrics import CONTENT_TYPE, ServerMetrics
from omniedge.runtime.openai_api import (
    ApiError,
    ChatRequest,
    Media,
    chunk,
    completion,
    final_chunks,
    parse_chat_request,
)
from omniedge.runtime.plan import BudgetError

if TYPE_CHECKING:
    import uvicorn

    from omniedge.runtime.app import Omni

log = logging.getLogger("omniedge.server")
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


@dataclass
class ServerLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    media_roots: tuple[Path, ...] = ()  # directories local paths may point into (none: paths refused)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`


def _error_of(e: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e).replace("\n  fix:", " (fix:") + ")", "server_busy", code="queue_full")
    if isinstance(e, OmniedgeError):
        message = e.problem + (f" (fix: {e.fix})" if e.fix else "")
        if isinstance(e, BudgetError):
            return ApiError(503, message, "insufficient_memory", code="memory_budget")
        return ApiError(400, message)  # bad media, a prompt past the context, bad sampling parameters
    log.error("request failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


def _error_response(e: BaseException) -> JSONResponse:
    err = _error_of(e)
    return JSONResponse(err.body(), status_code=err.status)


@contextlib.contextmanager
def _media_files(req: ChatRequest) -> Iterator[tuple[Path | None, Path | None]]:
    """Paths the decoders read: allowed local files as they are, data URLs written to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="omniedge-req-") as tmp:
        out: list[Path | None] = []
        for name, media in (("image", req.image), ("audio", req.audio)):
            if media is None:
                out.append(None)
            elif media.path is not None:
                out.append(media.path)
            else:
                p = Path(tmp) / f"{name}{media.suffix or '.bin'}"
                p.write_bytes(media.data or b"")
                out.append(p)
        yield out[0], out[1]


class _Job:
    """One request running in its own thread; events come back to the event loop through a queue."""

    def __init__(self, omni: Omni, req: ChatRequest) -> None:
        self.omni, self.req = omni, req
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()
        threading.Thread(target=self._work, name=f"omniedge-{req.id}", daemon=True).start()

    def _put(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _work(self) -> None:
        r = self.req
        try:
            with _media_files(r) as (image, audio):
                result = self.omni.chat(
                    r.prompt,
                    image=image,
                    audio=audio,
                    max_new_tokens=r.max_new_tokens,
                    temperature=r.temperature,
                    top_k=r.top_k,
                    top_p=r.top_p,
                    seed=r.seed,
                    system=r.system,
                    cancel=self.cancel,
                    on_token=lambda ev: self._put(("token", ev)),
                )
            self._put(("done", result))
        except BaseException as e:
            self._put(("error", e))


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` (read to a hard cap first, so the client sees the answer)."""
    declared = request.headers.get("content-length", "")
    parts, n = [], 0
    async for piece in request.stream():
        n += len(piece)
        if n <= limit:
            parts.append(piece)
        elif n > 8 * limit or (declared.isdigit() and int(declared) > 8 * limit):
            break
    if n > limit:
        raise ApiError(413, f"the request body is {n} bytes or more; this server takes at most {limit}",
                       code="request_too_large")  # fmt: skip
    return b"".join(parts)


def create_app(omni: Omni, model_name: str, limits: ServerLimits | None = None) -> Starlette:
    limits = limits or ServerLimits()
    roots = tuple(Path(r).expanduser().resolve() for r in limits.media_roots)
    metrics = ServerMetrics(omni)
    started = int(time.time())

    def authorized(request: Request) -> bool:
        return limits.api_key is None or request.headers.get("authorization") == f"Bearer {limits.api_key}"

    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        kind = "unknown"
        try:
            if not authorized(request):
                raise ApiError(
                    401, "missing or wrong API key", "authentication_error", code="invalid_api_key"
                )
            raw = await _read_body(request, limits.max_request_bytes)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from e
            req = parse_chat_request(body, model_name, roots)
            kind = req.kind
            job = _Job(omni, req)
            first = await job.events.get()
            if first[0] == "error":
                raise first[1]
            metrics.ttft.labels(kind).observe(time.perf_counter() - t0)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            resp = _error_response(e)
            metrics.requests.labels(kind, str(resp.status_code)).inc()
            return resp
        if req.stream:
            return StreamingResponse(stream(job, first, t0), media_type="text/event-stream")
        item = first
        while item[0] == "token":
            item = await job.events.get()
        if item[0] == "error":
            resp = _error_response(item[1])
            metrics.requests.labels(kind, str(resp.status_code)).inc()
            return resp
        done(kind, item[1], t0, 200)
        return JSONResponse(completion(req, item[1]))

    def done(kind: str, result: Any, t0: float, status: int) -> None:
        metrics.latency.labels(kind).observe(time.perf_counter() - t0)
        metrics.tokens.inc(len(result.token_ids))
        metrics.requests.labels(kind, str(status)).inc()

    async def stream(job: _Job, item: tuple[str, Any], t0: float) -> AsyncIterator[str]:
        req = job.req
        try:
            yield _sse(chunk(req, {"role": "assistant", "content": ""}))
            while True:
                if item[0] == "token":
                    if item[1].text:
                        yield _sse(chunk(req, {"content": item[1].text}))
                elif item[0] == "done":
                    for c in final_chunks(req, item[1]):
                        yield _sse(c)
                    done(req.kind, item[1], t0, 200)
                    break
                else:  # failed after the first token: the status is sent already, so say it in the stream
                    yield _sse(_error_of(item[1]).body())
                    metrics.requests.labels(req.kind, "500").inc()
                    break
                item = await job.events.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a client that went away stops the generation at the next token

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error_response(ApiError(401, "missing or wrong API key", "authentication_error"))
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "omniedge"}],
            }
        )

    async def health(request: Request) -> Response:
        s = omni.scheduler
        return JSONResponse(
            {
                "status": "ok",
                "model": model_name,
                "context": omni.max_context,
                "queue": {
                    "waiting": omni._queue.waiting,
                    "running": omni._queue.running,
                    "max_waiting": omni._queue.max_waiting,
                    "refused": omni._queue.refused,
                },
                "memory": s.snapshot() if s is not None else None,
            }
        )

    async def prometheus(request: Request) -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return JSONResponse(ApiError(status, f"{request.method} {request.url.path}: {detail}").body(), status)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
    )


def uvicorn_server(
    app: Starlette, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"
) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def start_in_thread(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> tuple[uvicorn.Server, str]:
    """Serve `app` from a background thread (port 0: any free port); returns the server and its base URL.
    Stop it with `server.should_exit = True`."""
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, name="omniedge-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise OmniedgeError(f"the server did not start on {host}:{port}", "is the port free?")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    return server, f"http://{host}:{bound[1]}"


__all__ = ["Media", "ServerLimits", "create_app", "start_in_thread", "uvicorn_server"]
