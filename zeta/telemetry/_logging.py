"""structlog loggers for zeta: silent until configured, prompts redacted unless enabled.

Every zeta logger goes through stdlib :mod:`logging` (so an application's own handlers see zeta's
events) and through :func:`redact_sensitive` first, whatever renders the event afterwards.
Nothing is configured at import (the ``zeta`` logger only gets the library's ``NullHandler``);
:func:`configure_logging` is the opt-in for applications and the CLI that want zeta's own output.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import logging
import sys
import traceback
import types
from collections.abc import Iterable, Iterator, Mapping
from json import dumps as _json_dumps
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from .._exceptions import ConfigError

__all__ = [
    "SENSITIVE_KEYS",
    "configure_logging",
    "get_logger",
    "redact_sensitive",
    "redacting",
]

#: Event keys (and object attributes) whose values are request content: prompts, completions,
#: streamed pieces, embedding inputs. Matched exactly, plus any key ending in ``_prompt``,
#: ``_text``, ``_texts``, ``_completion`` or ``_content``.
SENSITIVE_KEYS: frozenset[str] = frozenset(
    {
        "prompt", "prompts", "completion", "completions", "text", "texts", "content",
        "contents", "messages", "message_content", "input", "inputs", "output", "outputs",
        "piece", "pieces", "token", "response", "stop",
    }
)  # fmt: skip
_SENSITIVE_SUFFIXES = ("_prompt", "_text", "_texts", "_completion", "_content")
# ProcessorFormatter's bookkeeping for stdlib records; removed before rendering.
_STRUCTLOG_META = frozenset({"_record", "_from_structlog"})

#: Strings shorter than this are not scrubbed out of other text: replacing "a" or "ok" everywhere
#: would destroy messages without protecting anything.
MIN_SCRUB_LEN = 4
#: Shortest fragment of request content that is found anywhere in other text (``_Scrubber``).
FRAGMENT_LEN = 8
_SCRUBBED = "[redacted]"
_MAX_DEPTH = 4  # how deep values (dicts, lists, objects) are searched
_MAX_CALLER_FRAMES = 64  # caller frames searched for request content when an exception is logged

_log_prompts = False
_sensitive_values: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "zeta_sensitive_values", default=()
)

# The library convention (logging HOWTO, "Configuring Logging for a Library"): a handler on the
# ``zeta`` logger keeps stdlib's last-resort handler from printing zeta's warnings to stderr
# before anything is configured. It prints nothing itself; an application's own (root) handlers
# still receive every event.
logging.getLogger("zeta").addHandler(logging.NullHandler())


@contextlib.contextmanager
def redacting(*values: str) -> Iterator[None]:
    """Scrub ``values`` (a request's prompt, say) from every zeta log event emitted inside.

    Key-based redaction catches ``log.info(..., prompt=p)``; this catches the prompt quoted inside
    another string, such as an exception message from a backend. The values follow the context
    into worker threads started by ``anyio.to_thread.run_sync`` (it copies the context).
    """
    token = _sensitive_values.set(_sensitive_values.get() + tuple(v for v in values if v))
    try:
        yield
    finally:
        _sensitive_values.reset(token)


def _is_sensitive(key: object) -> bool:
    return isinstance(key, str) and (key in SENSITIVE_KEYS or key.endswith(_SENSITIVE_SUFFIXES))


def _placeholder(value: object) -> object:
    """What a sensitive value is replaced by: its size, never its content."""
    if value is None or isinstance(value, bool | int | float | enum.Enum):
        return value
    if isinstance(value, str | bytes | list | tuple | set | frozenset) and not value:
        return value  # nothing to hide
    if isinstance(value, str | bytes):
        return f"[redacted {len(value)} chars]"
    if isinstance(value, list | tuple | set | frozenset):
        return f"[redacted {len(value)} items]"
    return "[redacted]"


def _collect(value: object, into: set[str], depth: int = 0) -> None:
    """Add every string inside ``value`` (the value of a sensitive key) to ``into``."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, str):
        if len(value) >= MIN_SCRUB_LEN:
            into.add(value)
    elif isinstance(value, bytes):
        _collect(value.decode("utf-8", "replace"), into, depth + 1)
    elif isinstance(value, Mapping):
        for v in value.values():
            _collect(v, into, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            _collect(v, into, depth + 1)


def _attributes(obj: object) -> Mapping[str, object] | None:
    """An object's fields (dataclass fields, ``__dict__`` or ``__slots__``) without calling it."""
    if isinstance(obj, type | types.ModuleType | types.FunctionType | types.MethodType):
        return None
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        return d
    slots: list[str] = []
    for cls in type(obj).__mro__:
        s = cls.__dict__.get("__slots__", ())
        slots.extend((s,) if isinstance(s, str) else s)
    if slots:
        return {s: getattr(obj, s, None) for s in slots if not s.startswith("__")}
    return None


def _secrets_in_object(obj: object, into: set[str], depth: int) -> None:
    """Collect request content held by ``obj`` under a sensitive name, a few levels deep."""
    if depth > 3 or isinstance(obj, str | bytes | int | float | bool | type(None)):
        return
    if isinstance(obj, Mapping):
        items: Mapping[Any, object] = obj
    elif isinstance(obj, list | tuple):
        items = dict(enumerate(obj[:64]))
    else:
        attrs = _attributes(obj)
        if attrs is None:
            return
        items = attrs
    for k, v in items.items():
        if _is_sensitive(k):
            _collect(v, into)
        else:
            _secrets_in_object(v, into, depth + 1)


def _exceptions_in(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception chained to, grouped under or held by it, each once."""
    seen: set[int] = set()
    stack = [exc]
    while stack and len(seen) < 64:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        # A wrapper that carries the original as an attribute (``failure.error``).
        stack.extend(v for v in vars(e).values() if isinstance(v, BaseException))


def _secrets_in_traceback(exc: BaseException, into: set[str]) -> None:
    """Collect request content from the locals of the frames an exception passed through.

    A message that quotes the prompt was almost always formatted by a frame that holds it (as a
    local named ``prompt``, or inside ``params``/``msg``), or by one of that frame's callers.
    """
    frames: list[types.FrameType] = []
    for e in _exceptions_in(exc):
        # What the exception carries: a runtime error holding the failed request, say.
        _secrets_in_object(vars(e), into, 0)
        tb = e.__traceback__
        if tb is not None:
            caller = tb.tb_frame.f_back
            for _ in range(_MAX_CALLER_FRAMES):
                if caller is None:
                    break
                frames.append(caller)
                caller = caller.f_back
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
    seen: set[int] = set()
    for frame in frames:
        if id(frame) in seen:
            continue
        seen.add(id(frame))
        _secrets_in_object(dict(frame.f_locals), into, 0)


def _exception_of(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if (
        isinstance(exc_info, tuple)
        and len(exc_info) == 3
        and isinstance(exc_info[1], BaseException)
    ):
        return exc_info[1]
    if exc_info:
        return sys.exc_info()[1]
    return None


def _quoted_forms(value: str) -> set[str]:
    """``value`` as it may appear inside other text, itself excluded: in JSON, inside a repr
    (newlines escaped; ``'`` escaped or not, as the whole string's quotes decide), and inside
    the repr of a message that holds such a repr (an exception's repr)."""
    forms = {_json_dumps(value)[1:-1]}
    layer = {value}
    for _ in range(2):
        # repr() escapes ' only in a string that also holds a ": both, whatever surrounds it.
        layer = {q for v in layer for q in (repr(v)[1:-1], repr(v + "'\"")[1:-4])}
        forms |= layer
    forms.discard(value)
    return forms


#: Characters an escape sequence spans after its backslash, at most (``\U0001f600``).
_ESCAPE_TAIL = 9


def _windows_near_escapes(form: str) -> Iterator[str]:
    """The windows of a quoted form of a secret that are not windows of the secret itself.

    A window without a backslash that does not start in an escape sequence's tail is copied
    verbatim from the secret, so only windows holding or just after a backslash are new.
    """
    w = FRAGMENT_LEN
    last = len(form) - w
    starts: set[int] = set()
    i = form.find("\\")
    while i >= 0:
        starts.update(range(max(0, i - w + 1), min(last, i + _ESCAPE_TAIL) + 1))
        i = form.find("\\", i + 1)
    return (form[j : j + w] for j in starts)


class _Scrubber:
    """Removes request content from text: each secret, and every fragment of one.

    A fragment is any run of at least :data:`FRAGMENT_LEN` characters that also occurs in a
    secret, as is or quoted (a truncated or partly quoted prompt, ``prompt[5:17]!r`` in a
    backend's error message). Every ``FRAGMENT_LEN``-character window of every secret is indexed
    once; a window slid over the text at every offset then finds each such run whatever its
    length and offset, and overlapping hits merge into one redacted span. Work is linear in the
    total length of the secrets (once per event) plus the length of each text. Secrets shorter
    than ``FRAGMENT_LEN`` (but at least :data:`MIN_SCRUB_LEN`) are removed only where they occur
    whole.
    """

    __slots__ = ("_short", "_windows", "secrets")

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = frozenset(secrets)
        w = FRAGMENT_LEN
        short: set[str] = set()
        windows: set[str] = set()
        for secret in self.secrets:
            if len(secret) < w:
                short.add(secret)
                short |= _quoted_forms(secret)
                continue
            windows.update(secret[i : i + w] for i in range(len(secret) - w + 1))
            for form in _quoted_forms(secret):
                windows.update(_windows_near_escapes(form))
        self._short = tuple(short)
        self._windows = frozenset(windows)

    def with_secrets(self, more: Iterable[str]) -> _Scrubber:
        more = set(more) - self.secrets
        return _Scrubber(self.secrets | more) if more else self

    def __call__(self, text: str) -> str:
        spans: list[tuple[int, int]] = []
        for s in self._short:
            i = text.find(s)
            while i >= 0:
                spans.append((i, i + len(s)))
                i = text.find(s, i + 1)
        windows, w = self._windows, FRAGMENT_LEN
        if windows:
            spans.extend((i, i + w) for i in range(len(text) - w + 1) if text[i : i + w] in windows)
        if not spans:
            return text
        spans.sort()
        parts: list[str] = []
        last = 0  # end of the text kept so far
        start, stop = spans[0]
        for a, b in spans[1:]:
            if a <= stop:  # overlapping or touching: one span
                stop = max(stop, b)
                continue
            parts += (text[last:start], _SCRUBBED)
            last, (start, stop) = stop, (a, b)
        parts += (text[last:start], _SCRUBBED, text[stop:])
        return "".join(parts)


def _sanitize(value: object, scrub: _Scrubber, depth: int = 0) -> object:
    """Return ``value`` with sensitive fields replaced and known secrets scrubbed from strings."""
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, bool | int | float | enum.Enum) or depth > _MAX_DEPTH:
        return value
    if isinstance(value, BaseException):
        found: set[str] = set()
        with contextlib.suppress(Exception):
            _secrets_in_traceback(value, found)
        return scrub.with_secrets(found)(f"{type(value).__name__}: {value}")
    if isinstance(value, Mapping):
        return {
            k: _placeholder(v) if _is_sensitive(k) else _sanitize(v, scrub, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_sanitize(v, scrub, depth + 1) for v in value)
    if isinstance(value, set | frozenset):
        return [_sanitize(v, scrub, depth + 1) for v in value]
    attrs = _attributes(value)
    if attrs is not None and any(_is_sensitive(k) for k in attrs):
        # Its repr would print the prompt: render it ourselves with the content redacted.
        inner = ", ".join(
            f"{k}={_placeholder(v) if _is_sensitive(k) else _sanitize(v, scrub, depth + 1)!r}"
            for k, v in attrs.items()
        )
        return f"{type(value).__name__}({inner})"
    return value


def redact_sensitive(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: keep request content out of the event, tracebacks included.

    Unless :func:`configure_logging` was given ``log_prompts=True``, it

    - replaces the values of sensitive keys (:data:`SENSITIVE_KEYS`) with their size, at any
      depth, and redacts sensitive fields of objects whose repr would print them;
    - renders ``exc_info`` into an ``exception`` string without frame locals;
    - scrubs, from every string left (the exception text included), the content removed above,
      the values registered with :func:`redacting`, and request content found in the locals of
      the frames the exception passed through: each whole, and every fragment of
      :data:`FRAGMENT_LEN` or more characters of one, quoted or not.
    """
    if _log_prompts:
        return event_dict
    found: set[str] = set()
    _collect(_sensitive_values.get(), found)
    for k, v in event_dict.items():
        if _is_sensitive(k):
            _collect(v, found)
    exc = _exception_of(event_dict.pop("exc_info", None))
    exception_text = None
    # A broken object in some frame must not lose the event.
    with contextlib.suppress(Exception):
        if exc is not None:
            _secrets_in_traceback(exc, found)
        # An event logged while handling an exception often describes it (error=repr(exc)).
        active = sys.exc_info()[1]
        if active is not None and active is not exc:
            _secrets_in_traceback(active, found)
    if exc is not None:
        exception_text = "".join(traceback.format_exception(exc)).rstrip("\n")
    scrub = _Scrubber(found)
    out: EventDict = {}
    for k, v in event_dict.items():
        if k in _STRUCTLOG_META:
            out[k] = v
        else:
            out[k] = _placeholder(v) if _is_sensitive(k) else _sanitize(v, scrub)
    if exception_text is not None:
        out["exception"] = scrub(exception_text)
    return out


def get_logger(name: str) -> Any:
    """A structlog logger that goes through stdlib logging (silent until configured).

    Events pass :func:`redact_sensitive` before any handler, so an application that routes zeta's
    loggers into its own logging setup gets redacted events too.
    """
    return structlog.wrap_logger(
        logging.getLogger(name),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            redact_sensitive,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
    )


class _ZetaHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs; tagged so a second call replaces it."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The stdlib default prints the failing record's traceback, which may quote a prompt.
        exc = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            sys.stderr.write(f"zeta: could not log {record.name} event: {type(exc).__name__}\n")


def _level(level: str | int) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        mapping = logging.getLevelNamesMapping()
        if level.upper() in mapping:
            return mapping[level.upper()]
    raise ConfigError(f"unknown log level {level!r}", key="log_level")


def configure_logging(
    json: bool | None = None,
    level: str | int = "INFO",
    log_prompts: bool = False,
    *,
    stream: TextIO | None = None,
    logger_name: str = "zeta",
) -> logging.Handler:
    """Send zeta's log events to ``stream`` (stderr): JSON lines, or readable console output.

    Opt-in; zeta never calls it on import. Calling it again replaces the previous configuration.
    Only the ``zeta`` logger hierarchy is touched (it stops propagating to the root logger, so an
    application's own root handlers do not print zeta's events twice).

    Args:
        json: JSON lines if true, console output if false; ``None`` picks JSON unless ``stream``
            is a terminal.
        level: minimum level, a name (``"DEBUG"``) or a number.
        log_prompts: log request content (prompts, completions, texts) instead of redacting it.
            Off by default; turn on only where logs are as protected as the requests themselves.
        stream: where to write; defaults to ``sys.stderr``.
        logger_name: the stdlib logger to configure.

    Returns:
        The installed handler.

    Raises:
        ConfigError: ``level`` is not a logging level.
    """
    global _log_prompts
    lvl = _level(level)
    out = sys.stderr if stream is None else stream
    if json is None:
        isatty = getattr(out, "isatty", None)
        json = not (callable(isatty) and isatty())
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Records logged through plain stdlib calls on zeta's loggers get the same treatment.
        foreign_pre_chain=[structlog.stdlib.add_log_level, redact_sensitive],
        processors=[
            structlog.stdlib.add_logger_name,  # before the record it reads is removed
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Only reached with log_prompts=True (redaction renders exc_info itself): a plain
            # traceback, never one with frame locals.
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _ZetaHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger(logger_name)
    for old in [h for h in logger.handlers if isinstance(h, _ZetaHandler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False
    _log_prompts = bool(log_prompts)
    return handler


def reset_logging(logger_name: str = "zeta") -> None:
    """Undo :func:`configure_logging`: remove its handler, restore propagation and redaction."""
    global _log_prompts
    logger = logging.getLogger(logger_name)
    for old in [h for h in logger.handlers if isinstance(h, _ZetaHandler)]:
        logger.removeHandler(old)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    _log_prompts = False
