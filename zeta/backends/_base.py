"""The interface every backend implements.

A backend owns one inference context (one llama.cpp context, or one simulated model). Its
methods block; the owning actor calls them from one worker thread at a time and never enters a
context from two threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .._types import ModelSpec

#: Called with each generated piece of text; returning ``False`` stops generation early.
TokenCallback = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class CompletionParams:
    """What a completion asks of a backend."""

    prompt: str
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    seed: int = 0


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
    """One loaded context. Every method blocks and must be called from one thread at a time."""

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


class BackendFactory(Protocol):
    """Opens one context for ``spec`` (replica ``replica``). Blocks; raises ``ModelLoadError``."""

    def __call__(self, spec: ModelSpec, replica: int) -> Backend: ...
