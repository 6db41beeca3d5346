"""The interfaces a backend implements.

A backend owns one inference context (one llama.cpp context, or one simulated model). Its
methods block; the owning actor calls them from one worker thread at a time and never enters a
context from two threads at once. There are two interfaces:

* :class:`BatchBackend`: the context decodes up to ``slots`` completions together. The actor
  admits requests into free slots between decode steps and runs :meth:`BatchBackend.step` until
  one finishes (continuous batching).
* :class:`Backend`: the simple one, one completion at a time. The actor runs it through
  :class:`OneAtATime`, a batch backend with one slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .._chat import ChatPlan
from .._exceptions import BackendError
from .._types import ModelSpec

#: Called with each generated piece of text; returning ``False`` stops generation early.
TokenCallback = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class CompletionParams:
    """What a completion asks of a backend.

    A chat request carries its validated conversation as ``chat``: the backend renders it with
    the model's own chat template (``prompt`` is then only what ``kind="auto"`` was classified
    from) and constrains the output to ``chat.json_schema`` when there is one.
    """

    prompt: str
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    seed: int = 0
    chat: ChatPlan | None = None


@dataclass(frozen=True, slots=True)
class EmbedParams:
    """What an embedding request asks of a backend: one vector per text."""

    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished (or stopped) completion.

    ``first_token_s`` is the time from the call's start to the first generated token (prefill
    included); ``service_s`` the whole call. ``finish_reason`` is ``"length"``, ``"stop"`` or
    ``"cancelled"``.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    first_token_s: float
    service_s: float


@dataclass(frozen=True, slots=True)
class Embedding:
    """One pooled vector per input text."""

    vectors: list[list[float]]
    prompt_tokens: int
    service_s: float


class Backend(Protocol):
    """One loaded context that runs one completion at a time. Every method blocks and must be
    called from one thread at a time."""

    spec: ModelSpec

    def complete(
        self, params: CompletionParams, on_token: TokenCallback | None = None
    ) -> Completion:
        """Generate up to ``params.max_tokens`` tokens; stream pieces to ``on_token`` if given."""
        ...

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Return one pooled embedding per text."""
        ...

    def close(self) -> None:
        """Free the context. Called once; no other method is called afterwards."""
        ...


@runtime_checkable
class BatchBackend(Protocol):
    """One loaded context that decodes up to ``slots`` completions together, step by step.

    Every method blocks and must be called from one thread at a time. Sequences are named by
    the caller's keys (``seq``). A sequence's ``on_token`` is called from :meth:`step` with each
    new piece of its text; returning ``False`` stops it with finish reason ``"cancelled"``.
    """

    spec: ModelSpec
    #: How many sequences the context decodes together.
    slots: int

    def admit(self, seq: int, params: CompletionParams, on_token: TokenCallback | None) -> None:
        """Take a completion into a free slot; the following steps prefill and decode it.

        Raises:
            InvalidRequestError: the request cannot run here (its prompt and ``max_tokens`` do
                not fit a slot, or the model does not generate); nothing else changed.
            BackendError: this request failed; the context and the other sequences are fine.
        """
        ...

    def step(self) -> list[tuple[int, Completion]]:
        """One decode step over every admitted sequence: the next prefill chunk of those still
        reading their prompt, one new token for the others. Returns the sequences that ended in
        it (their slots are free again).

        Raises:
            BackendError: the step failed and every admitted sequence was dropped, but the
                context is usable.
            Exception: anything else means the context is broken.
        """
        ...

    def cancel(self, seq: int) -> None:
        """Drop sequence ``seq`` now (between steps) and free its slot; unknown keys are ignored."""
        ...

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Return one pooled embedding per text (between steps; running sequences wait)."""
        ...

    def close(self) -> None:
        """Free the context. Called once; no other method is called afterwards."""
        ...


class BackendFactory(Protocol):
    """Opens one context for ``spec`` (replica ``replica``). Blocks; raises ``ModelLoadError``."""

    def __call__(self, spec: ModelSpec, replica: int) -> Backend | BatchBackend: ...


class OneAtATime:
    """A :class:`Backend` as a :class:`BatchBackend` with one slot: a step is a whole call."""

    slots = 1

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.spec = backend.spec
        self._seq: tuple[int, CompletionParams, TokenCallback | None] | None = None

    def admit(self, seq: int, params: CompletionParams, on_token: TokenCallback | None) -> None:
        if self._seq is not None:
            raise BackendError(f"model {self.spec.name!r}: its one slot is taken")
        self._seq = (seq, params, on_token)

    def step(self) -> list[tuple[int, Completion]]:
        if self._seq is None:
            return []
        (seq, params, on_token), self._seq = self._seq, None
        return [(seq, self.backend.complete(params, on_token))]

    def cancel(self, seq: int) -> None:
        if self._seq is not None and self._seq[0] == seq:
            self._seq = None

    def embed(self, texts: Sequence[str]) -> Embedding:
        return self.backend.embed(texts)

    def close(self) -> None:
        self.backend.close()


def batched(backend: Backend | BatchBackend) -> BatchBackend:
    """``backend`` itself if it batches, else wrapped in :class:`OneAtATime`."""
    if isinstance(backend, BatchBackend):
        return backend
    return OneAtATime(backend)


def run_alone(
    backend: BatchBackend, params: CompletionParams, on_token: TokenCallback | None = None
) -> Completion:
    """Run one completion to its end on an otherwise idle batch backend (probes, tests)."""
    seq = -1
    backend.admit(seq, params, on_token)
    try:
        while True:
            for key, completion in backend.step():
                if key == seq:
                    return completion
    except BaseException:
        backend.cancel(seq)
        raise
