"""The ASGI app of ``zeta serve``: OpenAI's HTTP API over one :class:`~zeta.Scheduler`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /metrics`` (Prometheus), ``GET /health``
and ``GET /ready``. Every error is OpenAI's JSON shape (:mod:`zeta.serve._openai`).

A client that disconnects cancels its request at once, queued or generating, so its slot frees
for the next one: each request is awaited beside a task that waits for the ASGI
``http.disconnect`` message and cancels it. A streamed request is admitted before the response
starts, so a refusal (429 :class:`~zeta.Overloaded`, 503, ...) is a real HTTP status that a
client's retry logic sees; an error after the first event is an SSE ``error`` event, then
``[DONE]``.

Request bodies and prompts are never logged; a request that fails inside zeta is logged by the
scheduler's ledger (one ``request_finished`` line, no content), an unexpected failure here as
``http_request_failed`` with the exception's type only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .._chat import ChatResult
from .._config import ServeConfig
from .._exceptions import ZetaError
from .._request import CompletionResult
from .._scheduler import Scheduler
from .._snapshot import ActorState
from .._stream import TokenStream
from ..telemetry._logging import get_logger
from ..telemetry._metrics import ZetaCollector
from ._openai import (
    ApiError,
    Models,
    StreamEvents,
    api_error,
    chat_response,
    completion_response,
    dumps,
    embedding_response,
    model_entry,
    models_response,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_json,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

log = get_logger(__name__)

#: The largest request body read unless told otherwise (``[serve] max_body_bytes``).
DEFAULT_MAX_BODY_BYTES = ServeConfig().max_body_bytes

T = TypeVar("T")
_JSON = "application/json"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # a reverse proxy in front must not buffer the events
]


class _Gone:
    """What waiting for a result returns when the client disconnected first."""


_GONE = _Gone()


def create_app(
    scheduler: Scheduler,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens: int | None = None,
) -> Starlette:
    """An ASGI app serving OpenAI's API over ``scheduler``, for any ASGI server.

    If the scheduler is not running when the app starts (ASGI lifespan), the app runs it for its
    life; one that is already running is left to its owner.

    Args:
        scheduler: the scheduler every request goes to.
        api_key: the bearer key ``/v1/*`` and ``/metrics`` require (``None``: no key).
        max_body_bytes: the largest request body read; larger is HTTP 413.
        max_tokens: ``max_tokens`` of a request that gives none (``None``: the scheduler's).

    Raises:
        ConfigError: an invalid argument (named).
    """
    settings = ServeConfig(api_key=api_key, max_body_bytes=max_body_bytes, max_tokens=max_tokens)
    api = _Api(scheduler, settings)
    v1 = (
        ("/v1/chat/completions", api.chat, ["POST"]),
        ("/v1/completions", api.completions, ["POST"]),
        ("/v1/embeddings", api.embeddings, ["POST"]),
        ("/v1/models", api.models, ["GET"]),
        ("/v1/models/{model:path}", api.model, ["GET"]),
        ("/metrics", api.metrics, ["GET"]),
    )
    routes = [Route(path, api.endpoint(path, fn), methods=methods) for path, fn, methods in v1]
    routes += [
        Route("/health", api.endpoint("/health", api.health, auth=False), methods=["GET"]),
        Route("/ready", api.endpoint("/ready", api.ready, auth=False), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=api.lifespan,
        exception_handlers={HTTPException: _http_exception},
    )


class _Api:
    """The endpoints, and what they share: the scheduler, the key, the limits."""

    def __init__(self, scheduler: Scheduler, settings: ServeConfig) -> None:
        self.scheduler = scheduler
        self.table = Models.of(scheduler.models)
        key = settings.api_key
        # Compared as digests: equal lengths, so the comparison's time says nothing of the key.
        self._key = None if key is None else hashlib.sha256(key.encode()).digest()
        self._limit = settings.max_body_bytes
        self._max_tokens = settings.max_tokens
        self._id_prefix = secrets.token_hex(6)
        self._created = int(time.time())
        self._registry = CollectorRegistry(auto_describe=True)
        self._registry.register(ZetaCollector(scheduler))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.scheduler.running:
            yield
            return
        async with self.scheduler:
            yield

    def endpoint(
        self, route: str, handler: Callable[[Request], Awaitable[Response]], *, auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the key check, with every error turned into OpenAI's shape."""

        async def endpoint(request: Request) -> Response:
            try:
                if auth and self._key is not None:
                    self._check_key(request)
                return await handler(request)
            except ClientDisconnect:
                return _gone_response()
            except ZetaError as exc:
                return error_response(api_error(exc))
            except ApiError as exc:
                return error_response(exc)
            except Exception as exc:
                _log_failure(route, exc)
                return error_response(api_error(exc))

        return endpoint

    def _check_key(self, request: Request) -> None:
        assert self._key is not None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._key):
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, read up to the size limit."""
        limit = self._limit
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _too_large(limit) if length.isdigit() else ApiError(400, "Bad Content-Length.")
        # Read from ``receive`` directly: cheaper than Starlette's stream on the hot path.
        receive = request.receive
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return parse_json(b"".join(chunks))

    def _id(self, prefix: str, request_id: int) -> str:
        return f"{prefix}-{self._id_prefix}{request_id:x}"

    # -- the API ----------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        call = parse_chat(await self._body(request), self.table, self._max_tokens)
        created = int(time.time())
        zs = self.scheduler
        if call.stream:
            stream = zs.chat_stream(call.messages, **call.options)
            events = StreamEvents(
                True, self._id("chatcmpl", stream.request_id), created, call.model
            )
            return await _start_stream(request, stream, events, call.include_usage)
        result = await _unless_gone(request.receive, lambda: zs.chat(call.messages, **call.options))
        if isinstance(result, _Gone):
            return _gone_response()
        body = chat_response(result, self._id("chatcmpl", result.request_id), created)
        return Response(body, media_type=_JSON)

    async def completions(self, request: Request) -> Response:
        call = parse_completion(await self._body(request), self.table, self._max_tokens)
        created = int(time.time())
        zs = self.scheduler
        if call.stream:
            stream = zs.stream(call.prompt, **call.options)
            events = StreamEvents(False, self._id("cmpl", stream.request_id), created, call.model)
            return await _start_stream(request, stream, events, call.include_usage)
        result = await _unless_gone(
            request.receive, lambda: zs.complete(call.prompt, **call.options)
        )
        if isinstance(result, _Gone):
            return _gone_response()
        body = completion_response(result, self._id("cmpl", result.request_id), created)
        return Response(body, media_type=_JSON)

    async def embeddings(self, request: Request) -> Response:
        call = parse_embedding(await self._body(request), self.table)
        zs = self.scheduler
        result = await _unless_gone(request.receive, lambda: zs.embed(call.texts, **call.options))
        if isinstance(result, _Gone):
            return _gone_response()
        return Response(embedding_response(result, call), media_type=_JSON)

    async def models(self, request: Request) -> Response:
        return Response(models_response(self.table, self._created), media_type=_JSON)

    async def model(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self.table.ids:
            raise ApiError(
                404, f"The model {model[:64]!r} does not exist.", param="model",
                code="model_not_found",
            )  # fmt: skip
        return Response(dumps(model_entry(model, self._created)), media_type=_JSON)

    async def metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # The collector reads snapshots and psutil: off the event loop, like a scrape of
        # zeta's own metrics server.
        body = await anyio.to_thread.run_sync(encoder, self._registry)
        return Response(body, headers={"Content-Type": content_type})

    async def health(self, request: Request) -> Response:
        """Liveness: 200 while the scheduler runs."""
        running = self.scheduler.running
        body = dumps({"status": "ok" if running else "stopped"})
        return Response(body, status_code=200 if running else 503, media_type=_JSON)

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 when every model that is not ``optional`` has a replica serving."""
        zs = self.scheduler
        serving = {a.name for a in zs.snapshot().models if a.state is ActorState.READY}
        required = {m.name for m in zs.models if not m.optional}
        ready = zs.running and required <= serving
        body = dumps(
            {
                "status": "ready" if ready else "not_ready",
                "models": len(zs.models),
                "models_ready": len(serving),
            }
        )
        return Response(body, status_code=200 if ready else 503, media_type=_JSON)


# ------------------------------------------------------------------------------------------
# Waiting beside the client's connection.


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(receive: Receive, call: Callable[[], Awaitable[T]]) -> T | _Gone:
    """``await call()``, cancelled if the client disconnects first (then :data:`_GONE`)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio
        return await _unless_gone_anyio(receive, call)
    # asyncio, the hot path: a bare task watches the connection, and cancels the call's scope
    # from its done callback. A task group would do the same for three times the cost, which is
    # most of what HTTP adds to a short request.
    with anyio.CancelScope() as scope:
        watcher = loop.create_task(_disconnected(receive))
        watcher.add_done_callback(functools.partial(_watcher_done, scope))
        try:
            return await call()
        finally:
            watcher.cancel()
    return _GONE


def _watcher_done(scope: anyio.CancelScope, watcher: asyncio.Task[None]) -> None:
    if watcher.cancelled():
        return
    if watcher.exception() is None:  # the client disconnected
        scope.cancel()
    # else: receive() failed (the server is going down); the call goes on, and fails or ends.


async def _unless_gone_anyio(receive: Receive, call: Callable[[], Awaitable[T]]) -> T | _Gone:
    result: T | _Gone = _GONE

    async def watch() -> None:
        await _disconnected(receive)
        tg.cancel_scope.cancel()

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            result = await call()
        except Exception as exc:  # raised below, outside the task group (no exception group)
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def _first(stream: TokenStream[Any]) -> str | None:
    """The stream's first piece (admitting it), or ``None`` if it ended without one."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _start_stream(
    request: Request, stream: TokenStream[Any], events: StreamEvents, include_usage: bool
) -> Response:
    """Admit the stream and wait for its first piece before the response starts, so a refusal
    is an HTTP status; then stream the rest as server-sent events."""
    first = await _unless_gone(request.receive, lambda: _first(stream))
    if isinstance(first, _Gone):
        return _gone_response()
    if stream.model is not None:
        events.serve_as(stream.model)
    return _EventStream(stream, events, first, include_usage)


class _EventStream(Response):
    """A streamed completion as server-sent events, cancelled when the client disconnects."""

    def __init__(
        self,
        stream: TokenStream[ChatResult] | TokenStream[CompletionResult],
        events: StreamEvents,
        first: str | None,
        include_usage: bool,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_SSE_HEADERS)
        self._stream = stream
        self._events = events
        self._first = first
        self._include_usage = include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _unless_gone(receive, lambda: self._send_all(send))
        except OSError:  # the connection is gone; the stream is closed already
            pass

    async def _send_all(self, send: Send) -> None:
        events, stream = self._events, self._stream
        # Leaving this block for any reason (the client gone, an error, cancellation) stops the
        # request at its next token and frees its slot.
        async with stream:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            head = events.start()
            if self._first is not None:
                head += events.piece(self._first)
            await send({"type": "http.response.body", "body": head, "more_body": True})
            try:
                async for piece in stream:
                    body = events.piece(piece)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                result = stream.result
                assert result is not None  # the stream ended with its last piece
                tail = events.end(result, self._include_usage)
            except ZetaError as exc:
                tail = events.error(api_error(exc))
            except Exception as exc:
                _log_failure("stream", exc)
                tail = events.error(api_error(exc))
        await send({"type": "http.response.body", "body": tail, "more_body": False})


# ------------------------------------------------------------------------------------------
# Error responses.


def error_response(error: ApiError) -> Response:
    return Response(
        dumps(error.body()), status_code=error.status, headers=error.headers, media_type=_JSON
    )


def _gone_response() -> Response:
    # Nobody reads it: the client disconnected. 499 is what proxies log for that.
    return Response(b"", status_code=499)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no such route or method), in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ApiError(404, f"Unknown path {request.url.path[:100]!r}.", code="not_found")
    elif exc.status_code == 405:
        error = ApiError(
            405, f"Method {request.method} is not allowed here.", code="method_not_allowed",
            headers=dict(exc.headers or {}),
        )  # fmt: skip
    else:
        error = ApiError(exc.status_code, exc.detail)
    return error_response(error)


def _log_failure(route: str, exc: BaseException) -> None:
    """One line for an unexpected failure: where and what, never the request's content (a
    traceback renderer may print local variables, which hold the prompt)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else None
    log.error("http_request_failed", route=route, error=type(exc).__name__, where=where)
