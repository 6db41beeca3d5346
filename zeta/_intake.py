"""Intake: turns a call's arguments into a validated, classified :class:`~zeta._request.Request`.

The request options are defined once, as the typed dictionaries :class:`RequestOptions` and
:class:`CompletionOptions` that ``complete``, ``stream`` and ``embed`` take as keyword arguments,
and validated once, here, before anything is routed. Any problem is an
:class:`~zeta.InvalidRequestError` (or :class:`~zeta.NoCapableModelError`) raised at the call,
and the call is counted in the ledger like every request.

Valid values (anything else, including huge integers, NaN and text that is not valid Unicode,
is an :class:`~zeta.InvalidRequestError`):

=====================  =========================================================================
``prompt``, ``texts``  non-empty strings of valid Unicode (no lone surrogates); ``texts`` a
                       string or a non-empty sequence of them
``kind``               a :class:`~zeta.Kind` or its value (``"embed"`` only through ``embed``)
``max_tokens``         an integer in ``[1, MAX_TOKENS]``
``priority``           a :class:`~zeta.Priority` or its value
``deadline``           ``None`` or a number on the scheduler's clock, later than now
``admission_timeout``  ``None`` (wait until the deadline) or seconds ``>= 0`` (``math.inf`` ok)
``difficulty``         ``None`` or a number in ``[0, 1]``
``stop``               a sequence of strings (not one string)
``temperature``        a finite number in ``[0, MAX_TEMPERATURE]``
``seed``               an integer
``model``              ``None`` or the name of a configured model: the request runs there (on
                       the least loaded of its replicas), whatever the policy would choose; an
                       unknown name is an :class:`~zeta.UnknownModelError`, a model that does
                       not serve the kind a :class:`~zeta.NoCapableModelError`
``messages``           (chat) OpenAI-style messages; with ``tools``, ``tool_choice`` and
                       ``response_format``, validated by :func:`zeta._chat.plan_chat`
=====================  =========================================================================
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypedDict

import anyio

from ._chat import ChatPlan, plan_chat
from ._classifier import Classifier
from ._exceptions import InvalidRequestError, NoCapableModelError, UnknownModelError
from ._ledger import Ledger
from ._loop import EventLike
from ._policies import RouteRequest
from ._request import Request
from ._router import Router
from ._types import KIND_INDEX, Kind, Priority, shown
from .backends._base import CompletionParams, EmbedParams

__all__ = [
    "MAX_TEMPERATURE",
    "MAX_TOKENS",
    "ChatOptions",
    "CompletionOptions",
    "Intake",
    "RequestOptions",
]

#: The most tokens one completion may ask for.
MAX_TOKENS = 1 << 20
#: The highest sampling temperature accepted.
MAX_TEMPERATURE = 1000.0


class RequestOptions(TypedDict, total=False):
    """Keyword arguments every request takes (all optional).

    Attributes:
        priority: higher priority is served first within a mailbox (default ``NORMAL``).
        deadline: absolute time on :meth:`Scheduler.clock <zeta.Scheduler.clock>` by which the
            request must finish (default none).
        admission_timeout: seconds to wait for mailbox room when every capable mailbox is full
            (``0``: refuse at once, ``None``: until the deadline); default the scheduler's.
        model: run on this configured model (the least loaded of its replicas) instead of where
            the policy would place the request; ``None`` (the default) lets the policy choose.
    """

    priority: Priority | int
    deadline: float | None
    admission_timeout: float | None
    model: str | None


class CompletionOptions(RequestOptions, total=False):
    """Keyword arguments of a completion (all optional), besides :class:`RequestOptions`'.

    Attributes:
        kind: what the prompt asks for; ``"auto"`` (the default) runs the classifier.
        max_tokens: most tokens to generate (default 128).
        difficulty: ``[0, 1]`` hint for policies; default from the classifier (auto) or 0.5.
        stop: strings that end generation (not included in the text).
        temperature: sampling temperature; ``0`` (the default) is greedy.
        seed: sampling seed (default 0).
    """

    kind: Kind | str
    max_tokens: int
    difficulty: float | None
    stop: Sequence[str]
    temperature: float
    seed: int


class ChatOptions(CompletionOptions, total=False):
    """Keyword arguments of a chat request (all optional), besides :class:`CompletionOptions`'.

    ``kind="auto"`` classifies the conversation's system text and last user message.

    Attributes:
        tools: OpenAI-style tools, ``[{"type": "function", "function": {"name": ...,
            "description": ..., "parameters": <JSON schema>}}]``, rendered into the chat
            template.
        tool_choice: ``"none"``, ``"auto"`` (the default with tools: the model may answer with
            ``<tool_call>`` blocks, which are returned as ``tool_calls``), ``"required"`` (the
            reply is constrained to a call of one of the tools) or ``{"type": "function",
            "function": {"name": ...}}`` (a call of that tool).
        response_format: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type":
            "json_schema", "json_schema": {"name": ..., "schema": {...}}}``: the reply is
            constrained to JSON (valid for the schema).
    """

    tools: Sequence[Mapping[str, Any]] | None
    tool_choice: str | Mapping[str, Any] | None
    response_format: Mapping[str, Any] | None


_REQUEST_KEYS = frozenset(RequestOptions.__annotations__)
_COMPLETION_KEYS = frozenset(CompletionOptions.__annotations__) | _REQUEST_KEYS
_CHAT_KEYS = frozenset(ChatOptions.__annotations__) | _COMPLETION_KEYS
_TEXT_KINDS = (Kind.SIMPLE, Kind.CODE, Kind.REASON)


class Intake:
    """Validates and classifies calls into requests, numbering them; counts the invalid ones.

    Args:
        router: which kinds are served at all, and the preferred model of each.
        classifier: classifies ``kind="auto"`` prompts.
        ledger: where a call that fails here is counted.
        clock: the scheduler's clock.
        admission_timeout: the default admission timeout (already validated).
    """

    def __init__(
        self,
        router: Router,
        classifier: Classifier,
        ledger: Ledger,
        clock: Callable[[], float],
        admission_timeout: float | None,
    ) -> None:
        self._router = router
        self._classifier = classifier
        self._ledger = ledger
        self._clock = clock
        self._admission_timeout = math.inf if admission_timeout is None else admission_timeout
        self._ids = itertools.count(1)
        #: Makes the running loop's events (set when the scheduler starts).
        self.new_event: Callable[[], EventLike] = anyio.Event
        # What an auto request classified as each kind is served as: the kind itself if some
        # model serves it, else the first served text kind ("auto" means "you decide").
        capable = router.capable
        served = [k for k in _TEXT_KINDS if capable[k]]
        self._auto_kinds: dict[Kind, Kind] = {
            k: k if capable[k] else (served[0] if served else Kind.SIMPLE) for k in _TEXT_KINDS
        }

    def completion(self, prompt: object, options: Mapping[str, Any], *, stream: bool) -> Request:
        """A validated, classified completion request.

        Raises:
            InvalidRequestError, NoCapableModelError: after counting the call as invalid.
            Exception: whatever a custom classifier raised, after counting the call as an error.
        """
        return self._generation(prompt, None, options, stream=stream)

    def chat(self, messages: object, options: Mapping[str, Any], *, stream: bool) -> Request:
        """A validated, classified chat request (its ``payload.chat`` is the
        :class:`~zeta._chat.ChatPlan`).

        Raises:
            InvalidRequestError, NoCapableModelError: after counting the call as invalid.
            Exception: whatever a custom classifier raised, after counting the call as an error.
        """
        return self._generation(None, messages, options, stream=stream)

    def _generation(
        self, prompt: object, messages: object, options: Mapping[str, Any], *, stream: bool
    ) -> Request:
        now = self._clock()
        rid = next(self._ids)
        label = Kind.AUTO.value
        chat: ChatPlan | None = None
        try:
            if messages is None:
                _known(options, _COMPLETION_KEYS)
                text = _text(prompt, "prompt")
            else:
                _known(options, _CHAT_KEYS)
                chat = plan_chat(
                    messages,
                    tools=options.get("tools"),
                    tool_choice=options.get("tool_choice"),
                    response_format=options.get("response_format"),
                )
                text = chat.classifier_text
            rows = self._rows(options)
            kind = options.get("kind", Kind.AUTO)
            k = kind if type(kind) is Kind else _kind(kind)
            label = k.value
            if k is Kind.EMBED:
                raise InvalidRequestError("use embed() for embeddings")
            max_tokens = options.get("max_tokens", 128)
            if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_TOKENS:
                raise InvalidRequestError(
                    f"max_tokens must be an integer in [1, {MAX_TOKENS}], got {shown(max_tokens)}"
                )
            priority, deadline, admission_timeout = self._common(options, now)
            difficulty = options.get("difficulty")
            if difficulty is not None:
                difficulty = _number(difficulty, "difficulty", 1.0)
            stop = _stop(options.get("stop", ()))
            temperature = _number(options.get("temperature", 0.0), "temperature", MAX_TEMPERATURE)
            seed = options.get("seed", 0)
            if type(seed) is not int:
                raise InvalidRequestError(f"seed must be an integer, got {shown(seed)}")
            if k is Kind.AUTO:
                verdict = self._classifier.classify(text) if text else None
                k = Kind.SIMPLE if verdict is None else verdict.kind
                k = self._auto_kind(k, rows)
                label = k.value
                diff = 0.5 if verdict is None else verdict.difficulty
                if difficulty is not None:
                    diff = difficulty
            else:
                diff = 0.5 if difficulty is None else difficulty
            self._check_served(k, rows, options)
            params = CompletionParams(text, max_tokens, stop, temperature, seed, chat)
        except Exception as exc:
            # Also a custom classifier's own exception: it reaches the caller as it is, and the
            # call is counted (as an error) like every other.
            self._ledger.record_unrouted(rid, label, now, exc)
            raise
        return Request(
            rid,
            params,
            RouteRequest(k, KIND_INDEX[k], float(max_tokens), diff, priority, rows),
            created_at=now,
            deadline=deadline,
            admission_timeout=admission_timeout,
            stream=stream,
            preferred=self._router.preferred[k],
            new_event=self.new_event,
        )

    def embedding(self, texts: object, options: Mapping[str, Any]) -> Request:
        """A validated embedding request.

        Raises:
            InvalidRequestError, NoCapableModelError: after counting the call as invalid.
        """
        now = self._clock()
        rid = next(self._ids)
        try:
            _known(options, _REQUEST_KEYS)
            if isinstance(texts, str):
                batch: tuple[str, ...] = (_text(texts, "texts"),)
            else:
                try:
                    batch = tuple(_iterable(texts))
                except TypeError:
                    raise InvalidRequestError(
                        "texts must be a string or a sequence of strings"
                    ) from None
                if not batch:
                    raise InvalidRequestError("texts must not be empty")
                for t in batch:
                    _text(t, "every text")
            priority, deadline, admission_timeout = self._common(options, now)
            rows = self._rows(options)
            self._check_served(Kind.EMBED, rows, options)
        except Exception as exc:
            self._ledger.record_unrouted(rid, Kind.EMBED.value, now, exc)
            raise
        return Request(
            rid,
            EmbedParams(batch),
            RouteRequest(Kind.EMBED, KIND_INDEX[Kind.EMBED], 0.0, 0.5, priority, rows),
            created_at=now,
            deadline=deadline,
            admission_timeout=admission_timeout,
            preferred=self._router.preferred[Kind.EMBED],
            new_event=self.new_event,
        )

    def _rows(self, options: Mapping[str, Any]) -> tuple[int, ...] | None:
        """The candidate rows of the model ``model=`` names, or ``None``."""
        model = options.get("model")
        if model is None:
            return None
        if type(model) is not str:
            raise InvalidRequestError(f"model must be a string, got {shown(model)}")
        rows = self._router.rows.get(model)
        if rows is None:
            raise UnknownModelError(
                f"no configured model is named {shown(model)}; the models are "
                f"{sorted(self._router.rows)}"
            )
        return rows

    def _auto_kind(self, verdict: Kind, rows: tuple[int, ...] | None) -> Kind:
        """What an auto request classified as ``verdict`` is served as: the kind itself if it
        is served (by the pinned model, if any), else the first such text kind."""
        if rows is None:
            return self._auto_kinds.get(verdict, Kind.SIMPLE)
        kinds = self._router.candidates[rows[0]].kinds
        if verdict in kinds:
            return verdict
        return next((k for k in _TEXT_KINDS if k in kinds), verdict)

    def _check_served(
        self, kind: Kind, rows: tuple[int, ...] | None, options: Mapping[str, Any]
    ) -> None:
        if rows is None:
            if not self._router.capable[kind]:
                raise NoCapableModelError(f"no configured model serves {kind.value!r}")
        elif kind not in self._router.candidates[rows[0]].kinds:
            raise NoCapableModelError(
                f"model {options.get('model')!r} does not serve {kind.value!r}"
            )

    def _common(
        self, options: Mapping[str, Any], now: float
    ) -> tuple[Priority, float | None, float]:
        """Priority, deadline and admission timeout (``math.inf``: until the deadline)."""
        priority = options.get("priority", Priority.NORMAL)
        if type(priority) is not Priority:
            try:
                priority = Priority(priority)
            except (ValueError, TypeError):
                raise InvalidRequestError(
                    f"unknown priority {shown(priority)}; expected one of {[p.name for p in Priority]}"
                ) from None
        deadline = options.get("deadline")
        if deadline is not None:
            deadline = _number(deadline, "deadline", math.inf, low=-math.inf)
            if deadline <= now:
                raise InvalidRequestError("deadline is in the past")
            if deadline == math.inf:
                deadline = None
        if "admission_timeout" not in options:
            admission_timeout = self._admission_timeout
        else:
            value = options["admission_timeout"]
            admission_timeout = (
                math.inf if value is None else _number(value, "admission_timeout", math.inf)
            )
        return priority, deadline, admission_timeout


def _known(options: Mapping[str, Any], keys: frozenset[str]) -> None:
    for key in options:
        if key not in keys:
            raise InvalidRequestError(
                f"unknown option {shown(key)}; the options are {sorted(keys)}"
            )


def _text(value: object, what: str) -> str:
    """A non-empty string of valid Unicode."""
    if type(value) is not str or not value:
        raise InvalidRequestError(f"{what} must be a non-empty string")
    return _unicode(value, what)


def _unicode(value: str, what: str) -> str:
    """``value``, if it is valid Unicode (llama.cpp takes UTF-8: a lone surrogate has none)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{what} is not valid Unicode: a lone surrogate at index {exc.start}"
            ) from None
    return value


def _iterable(value: object) -> Iterable[Any]:
    """``value`` as an iterable, for ``tuple()`` to try (it raises ``TypeError`` if it is not)."""
    return value  # type: ignore[return-value]


def _kind(kind: object) -> Kind:
    try:
        return Kind(kind)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise InvalidRequestError(
            f"unknown kind {shown(kind)}; expected one of {[x.value for x in Kind]}"
        ) from None


def _number(value: object, what: str, high: float, *, low: float = 0.0) -> float:
    """``value`` as a float in ``[low, high]`` (booleans, NaN and overflowing integers refused)."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"{what} must be a number, got {shown(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise InvalidRequestError(f"{what} is out of range: {shown(value)}") from None
    if not low <= value <= high:  # also NaN
        raise InvalidRequestError(f"{what} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def _stop(stop: object) -> tuple[str, ...]:
    if not stop:
        return ()
    stops: tuple[object, ...] = ()
    if not isinstance(stop, str):
        try:
            stops = tuple(_iterable(stop))
        except TypeError:
            pass
    if not stops or not all(type(x) is str for x in stops):
        raise InvalidRequestError("stop must be a sequence of strings")
    for x in stops:
        _unicode(x, "every stop string")  # type: ignore[arg-type]
    return stops  # type: ignore[return-value]
