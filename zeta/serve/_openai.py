"""OpenAI's wire format: request bodies into scheduler calls, results into response bodies.

Pure translation, no I/O: the app (:mod:`zeta.serve._app`) reads the body, calls the scheduler
and sends what this module builds.

Request fields follow OpenAI's API. A field zeta implements is mapped onto the scheduler's
options (``max_tokens``, ``temperature``, ``seed``, ``stop``, and for chat ``tools``,
``tool_choice``, ``response_format``), and the library validates its value. A field OpenAI defines
that only tunes sampling or bookkeeping (``top_p``, the penalties, ``user``, ``metadata``, ...) is
accepted and ignored. A field that asks for a response zeta cannot give (``n`` above 1,
``logprobs``, audio) is refused with HTTP 400 naming it, and so is a field OpenAI does not define,
as OpenAI itself does, so a misspelt option never passes silently. ``null`` is the same as
leaving a field out.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._chat import ChatResult, ToolCall
from .._exceptions import (
    ActorDead,
    BackendError,
    DeadlineExceeded,
    InvalidInputError,
    ModelUnavailable,
    Overloaded,
    SchedulerClosed,
    TryAgainError,
    UnknownModelError,
)
from .._request import CompletionResult, EmbeddingResult
from .._types import Kind, ModelSpec

__all__ = [
    "ApiError",
    "ChatCall",
    "CompletionCall",
    "EmbeddingCall",
    "Models",
    "StreamEvents",
    "api_error",
    "chat_response",
    "completion_response",
    "embedding_response",
    "parse_chat",
    "parse_completion",
    "parse_embedding",
    "parse_json",
]

#: Aliases the ``model`` field may give instead of a configured model's name: ``auto`` lets the
#: classifier choose the kind, the others name it.
TEXT_ALIASES = ("auto", Kind.SIMPLE.value, Kind.CODE.value, Kind.REASON.value)
EMBED_ALIAS = Kind.EMBED.value

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def dumps(value: object) -> bytes:
    """Compact JSON as UTF-8 bytes (what every response body is)."""
    return _dumps(value).encode()


# --------------------------------------------------------------------------------------------
# Errors.


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {message, type, param, code}}``.

    Raised while handling a request; the app turns it into the response (or, once a stream has
    started, into an SSE error event).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def api_error(exc: Exception) -> ApiError:
    """The response a scheduler error stands for.

    :class:`~zeta.Overloaded` is 429 with ``Retry-After`` (whole seconds, rounded up) and
    ``retry-after-ms``, which OpenAI's clients prefer; the other "try again" errors are 503
    (504 for a deadline); an unknown model 404; invalid input 400; anything else 500, whose
    message says nothing about the request.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        hint = max(0.0, exc.retry_after) if math.isfinite(exc.retry_after) else 3600.0
        ms = max(1, math.ceil(hint * 1000))
        return ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code="overloaded",
            headers={"Retry-After": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)},
        )
    if isinstance(exc, UnknownModelError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc))
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, str(exc), type="timeout_error", code="deadline_exceeded")
    for cls, code in (
        (ModelUnavailable, "model_unavailable"),
        (ActorDead, "actor_dead"),
        (SchedulerClosed, "shutting_down"),
        (TryAgainError, "unavailable"),
    ):
        if isinstance(exc, cls):
            return ApiError(503, str(exc), type="service_unavailable_error", code=code)
    if isinstance(exc, BackendError):
        return ApiError(500, str(exc), type="server_error", code="backend_error")
    return ApiError(500, "internal server error", type="server_error", code="internal_error")


def unknown_model(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {_short(model)!r} does not exist; GET /v1/models lists the models served",
        param="model",
        code="model_not_found",
    )


def _short(text: str) -> str:
    return text if len(text) <= 64 else f"{text[:61]}..."


# --------------------------------------------------------------------------------------------
# Reading a body.


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object.

    Raises:
        ApiError: 400, the body is not a JSON object (or not JSON at all, not UTF-8, nested too
            deeply, or holds ``NaN``).
    """
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad(
            "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise _bad("The request body must be a JSON object.", code="invalid_json")
    return value


class _Fields:
    """One body's fields, read once each; what is left at the end is refused."""

    def __init__(self, body: Mapping[str, Any], ignored: frozenset[str]) -> None:
        # null is the same as absent.
        self._rest = {k: v for k, v in body.items() if v is not None and k not in ignored}

    def take(self, name: str) -> Any:
        return self._rest.pop(name, None)

    def text(self, name: str, *, required: bool = False) -> str | None:
        value = self.take(name)
        if value is None:
            if required:
                raise _bad(
                    f"Missing required parameter: {name!r}.", name, "missing_required_parameter"
                )
            return None
        if not isinstance(value, str):
            raise _bad(f"{name!r} must be a string.", name, "invalid_type")
        return value

    def flag(self, name: str) -> bool:
        value = self.take(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise _bad(f"{name!r} must be a boolean.", name, "invalid_type")
        return value

    def table(self, name: str) -> Mapping[str, Any] | None:
        value = self.take(name)
        if value is not None and not isinstance(value, dict):
            raise _bad(f"{name!r} must be an object.", name, "invalid_type")
        return value

    def default(self, name: str, allowed: Iterable[object], why: str) -> None:
        """Refuse ``name`` unless it is absent or one of the values meaning OpenAI's default."""
        value = self.take(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise _bad(f"{name!r} is not supported: {why}.", name, "unsupported_parameter")

    def finish(self) -> None:
        for name in self._rest:
            raise _bad(
                f"Unrecognized request argument supplied: {_short(name)}",
                _short(name),
                "unknown_parameter",
            )


# Fields OpenAI defines that change nothing zeta returns: sampling fine-tuning zeta's backends do
# not take, and bookkeeping.
_IGNORED_SAMPLING = frozenset(
    {"top_p", "frequency_penalty", "presence_penalty", "logit_bias", "user", "service_tier"}
)
_IGNORED_CHAT = _IGNORED_SAMPLING | frozenset(
    {
        "metadata", "store", "parallel_tool_calls", "reasoning_effort", "verbosity",
        "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "prediction",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models and aliases.


@dataclass(frozen=True, slots=True)
class Models:
    """What the ``model`` field may name: each configured model, and the kind aliases some
    model serves (``auto`` when any text kind is served). A configured name wins over an alias."""

    names: tuple[str, ...]
    text_aliases: tuple[str, ...]
    embed_aliases: tuple[str, ...]
    #: The configured models that serve some text kind, and those that serve ``embed``.
    text_models: frozenset[str] = frozenset()
    embed_models: frozenset[str] = frozenset()

    @classmethod
    def of(cls, specs: Sequence[ModelSpec]) -> Models:
        served = {k for m in specs for k in m.kinds}
        text = tuple(a for a in TEXT_ALIASES[1:] if Kind(a) in served)
        return cls(
            names=tuple(m.name for m in specs),
            text_aliases=("auto", *text) if text else (),
            embed_aliases=("embed", "auto") if Kind.EMBED in served else (),
            text_models=frozenset(m.name for m in specs if set(m.kinds) - {Kind.EMBED}),
            embed_models=frozenset(m.name for m in specs if Kind.EMBED in m.kinds),
        )

    @property
    def ids(self) -> tuple[str, ...]:
        """Every id ``/v1/models`` lists, configured names first."""
        extra = [a for a in (*self.text_aliases, *self.embed_aliases) if a not in self.names]
        return (*self.names, *dict.fromkeys(extra))

    def text(self, model: str) -> dict[str, Any]:
        """The scheduler options that route a completion or chat to ``model``."""
        if model in self.text_models:
            return {"model": model}
        if model not in self.names and model in self.text_aliases:
            return {"kind": model}
        if model in self.embed_models or model in self.embed_aliases:
            raise _bad(
                f"The model {model!r} serves embeddings; use POST /v1/embeddings.", "model",
                "wrong_endpoint",
            )  # fmt: skip
        raise unknown_model(model)

    def embed(self, model: str) -> dict[str, Any]:
        """The scheduler options that route an embedding to ``model``."""
        if model in self.embed_models:
            return {"model": model}
        if model not in self.names and model in self.embed_aliases:
            return {}
        if model in self.text_models or model in self.text_aliases:
            raise _bad(
                f"The model {model!r} does not serve embeddings; use 'embed' or an embedding "
                "model's name.", "model", "wrong_endpoint",
            )  # fmt: skip
        raise unknown_model(model)


# --------------------------------------------------------------------------------------------
# Requests.


@dataclass(slots=True)
class ChatCall:
    """A parsed ``POST /v1/chat/completions``: ``scheduler.chat(messages, **options)``."""

    model: str
    messages: list[Any]
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


@dataclass(slots=True)
class CompletionCall:
    """A parsed ``POST /v1/completions``: ``scheduler.complete(prompt, **options)``."""

    model: str
    prompt: str
    options: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


@dataclass(slots=True)
class EmbeddingCall:
    """A parsed ``POST /v1/embeddings``: ``scheduler.embed(texts, **options)``."""

    model: str
    texts: str | list[str]
    options: dict[str, Any]
    base64: bool = False
    dimensions: int | None = None


def _sampling(f: _Fields, options: dict[str, Any], default_max_tokens: int | None) -> None:
    """``max_tokens``, ``temperature``, ``seed`` and ``stop`` into ``options``; the scheduler
    validates their values."""
    max_tokens = f.take("max_completion_tokens")
    legacy = f.take("max_tokens")
    if max_tokens is None:
        max_tokens = legacy
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    for name in ("temperature", "seed"):
        value = f.take(name)
        if value is not None:
            options[name] = value
    stop = f.take("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop


def _streaming(f: _Fields) -> tuple[bool, bool]:
    stream = f.flag("stream")
    stream_options = f.table("stream_options") or {}
    usage = stream_options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _bad(
            "'stream_options.include_usage' must be a boolean.", "stream_options", "invalid_type"
        )
    return stream, bool(usage)


def parse_chat(body: Mapping[str, Any], models: Models, max_tokens: int | None) -> ChatCall:
    """Raises :class:`ApiError` (400, or 404 for an unknown model)."""
    f = _Fields(body, _IGNORED_CHAT)
    model = f.text("model", required=True)
    assert model is not None
    messages = f.take("messages")
    if messages is None:
        raise _bad(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of messages.", "messages", "invalid_type")
    options = models.text(model)
    stream, include_usage = _streaming(f)
    _sampling(f, options, max_tokens)
    for name in ("tools", "tool_choice", "response_format"):
        value = f.take(name)
        if value is not None:
            options[name] = value
    f.default("n", (1,), "zeta returns one choice")
    f.default("logprobs", (False,), "zeta does not return log probabilities")
    f.default("top_logprobs", (0,), "zeta does not return log probabilities")
    f.default("modalities", (["text"],), "zeta returns text")
    f.default("audio", (), "zeta returns text")
    f.default("web_search_options", (), "zeta has no web search")
    f.default("functions", (), "use 'tools'")
    f.default("function_call", (), "use 'tool_choice'")
    f.finish()
    return ChatCall(model, messages, options, stream, include_usage)


def parse_completion(
    body: Mapping[str, Any], models: Models, max_tokens: int | None
) -> CompletionCall:
    """Raises :class:`ApiError` (400, or 404 for an unknown model)."""
    f = _Fields(body, _IGNORED_SAMPLING)
    model = f.text("model", required=True)
    assert model is not None
    prompt = f.take("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise _bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise _bad(
            "'prompt' must be a string (or an array of one string); token arrays and batches "
            "are not supported.", "prompt", "invalid_type",
        )  # fmt: skip
    options = models.text(model)
    stream, include_usage = _streaming(f)
    _sampling(f, options, max_tokens)
    f.default("n", (1,), "zeta returns one choice")
    f.default("best_of", (1,), "zeta returns one choice")
    f.default("logprobs", (0,), "zeta does not return log probabilities")
    f.default("echo", (False,), "zeta does not echo the prompt")
    f.default("suffix", ("",), "zeta does not insert text")
    f.finish()
    return CompletionCall(model, prompt, options, stream, include_usage)


def parse_embedding(body: Mapping[str, Any], models: Models) -> EmbeddingCall:
    """Raises :class:`ApiError` (400, or 404 for an unknown model)."""
    f = _Fields(body, frozenset({"user"}))
    model = f.text("model", required=True)
    assert model is not None
    texts = f.take("input")
    if texts is None:
        raise _bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if not (
        isinstance(texts, str)
        or (isinstance(texts, list) and all(isinstance(t, str) for t in texts))
    ):
        raise _bad(
            "'input' must be a string or an array of strings; token arrays are not supported.",
            "input", "invalid_type",
        )  # fmt: skip
    options = models.embed(model)
    encoding = f.text("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _bad(
            "'encoding_format' must be 'float' or 'base64'.", "encoding_format", "invalid_value"
        )
    dimensions = f.take("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise _bad("'dimensions' must be an integer.", "dimensions", "invalid_type")
    f.finish()
    return EmbeddingCall(model, texts, options, encoding == "base64", dimensions)


# --------------------------------------------------------------------------------------------
# Responses.


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


#: The library's finish reasons in OpenAI's words (a request whose client left ends "cancelled",
#: which no client sees).
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def _tool_calls(calls: Sequence[ToolCall], *, indexed: bool) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        item: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        if indexed:
            item = {"index": i, **item}
        out.append(item)
    return out


def chat_response(result: ChatResult, response_id: str, created: int) -> bytes:
    """The body of a non-streamed chat completion from a :class:`~zeta.ChatResult`."""
    message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    if result.tool_calls:
        message["tool_calls"] = _tool_calls(result.tool_calls, indexed=False)
        if not result.text:
            message["content"] = None
    return dumps(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": result.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _FINISH.get(result.finish_reason, result.finish_reason),
                }
            ],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }
    )


def completion_response(result: CompletionResult, response_id: str, created: int) -> bytes:
    """The body of a non-streamed text completion."""
    return dumps(
        {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": result.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "text": result.text,
                    "logprobs": None,
                    "finish_reason": _FINISH.get(result.finish_reason, result.finish_reason),
                }
            ],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }
    )


def embedding_response(result: EmbeddingResult, call: EmbeddingCall) -> bytes:
    """The body of an embeddings response; vectors as float arrays or base64 little-endian
    float32, as ``encoding_format`` asked.

    Raises:
        ApiError: 400, ``dimensions`` asked for another length than the model's.
    """
    dimensions = call.dimensions
    if dimensions is not None and result.vectors and dimensions != len(result.vectors[0]):
        raise _bad(
            f"'dimensions' must be {len(result.vectors[0])} for this model; zeta does not "
            "shorten embeddings.", "dimensions", "unsupported_parameter",
        )  # fmt: skip
    data = []
    for i, vector in enumerate(result.vectors):
        embedding: object = vector
        if call.base64:
            raw = np.asarray(vector, dtype="<f4").tobytes()
            embedding = base64.b64encode(raw).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return dumps(
        {
            "object": "list",
            "data": data,
            "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


def models_response(models: Models, created: int) -> bytes:
    return dumps({"object": "list", "data": [model_entry(m, created) for m in models.ids]})


def model_entry(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "zeta"}


# --------------------------------------------------------------------------------------------
# Server-sent events.

DONE = b"data: [DONE]\n\n"


def event(value: object) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


@dataclass(slots=True)
class StreamEvents:
    """The SSE events of one streamed chat or text completion.

    Content events are built from a prefix and suffix made once, so a token costs one JSON string
    encoding. Events name the model the client asked for until :meth:`serve_as` names the one
    the request was placed on (it is known once the stream is admitted, before the first event);
    the last ones (finish and usage) name the model that served it.
    """

    chat: bool
    response_id: str
    created: int
    model: str
    _head: bytes = field(init=False)
    _tail: bytes = field(init=False)

    def __post_init__(self) -> None:
        head = self._frame(self.model, {"__": None})
        # Split the frame of a content chunk around its content's JSON string.
        marker = dumps({"__": None})[1:-1]  # b'"__":null'
        before, _, after = head.partition(marker)
        key = b'"delta":{"content":' if self.chat else b'"text":'
        self._head = b"data: " + before + key
        self._tail = (b"}" if self.chat else b"") + after + b"\n\n"

    def serve_as(self, model: str) -> None:
        """Name ``model`` in the events from now on."""
        if model != self.model:
            self.model = model
            self.__post_init__()

    def _frame(self, model: str, choice: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": None}],
        }
        return dumps(body)

    def start(self) -> bytes:
        """The first event: the assistant role (chat), nothing for a text completion."""
        if not self.chat:
            return b""
        return (
            b"data: "
            + self._frame(self.model, {"delta": {"role": "assistant", "content": ""}})
            + b"\n\n"
        )

    def piece(self, text: str) -> bytes:
        return self._head + _dumps(text).encode() + self._tail

    def end(self, result: ChatResult | CompletionResult, include_usage: bool) -> bytes:
        """Tool calls (chat), the finish reason, the usage chunk if asked for, and ``[DONE]``."""
        finish = _FINISH.get(result.finish_reason, result.finish_reason)
        events = []
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            tool_calls = result.tool_calls if isinstance(result, ChatResult) else ()
            if tool_calls:
                delta = {"tool_calls": _tool_calls(tool_calls, indexed=True)}
                events.append(
                    self._chunk(
                        result.model,
                        [{**choice, "delta": delta, "logprobs": None, "finish_reason": None}],
                    )
                )
            choice["delta"] = {}
        else:
            choice["text"] = ""
        events.append(
            self._chunk(result.model, [{**choice, "logprobs": None, "finish_reason": finish}])
        )
        if include_usage:
            usage = _usage(result.prompt_tokens, result.completion_tokens)
            events.append(self._chunk(result.model, [], usage))
        events.append(DONE)
        return b"".join(events)

    def _chunk(
        self, model: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return event(body)

    @staticmethod
    def error(error: ApiError) -> bytes:
        """An error after the stream started: an ``error`` event, then ``[DONE]``."""
        return event(error.body()) + DONE
