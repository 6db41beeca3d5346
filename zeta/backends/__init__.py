"""Inference backends, loaded by name so heavy dependencies are imported only when chosen."""

from __future__ import annotations

import importlib

from .._exceptions import ConfigError
from ._base import (
    Backend,
    BackendFactory,
    Completion,
    CompletionParams,
    Embedding,
    EmbedParams,
    TokenCallback,
)

__all__ = [
    "Backend", "BackendFactory", "Completion", "CompletionParams", "EmbedParams", "Embedding",
    "TokenCallback",
    "get_backend", "BACKENDS",
]  # fmt: skip

#: Backend name -> "module:factory". The module is imported on first use.
BACKENDS: dict[str, str] = {
    "simulated": "zeta.backends.simulated:open_backend",
    "llama_cpp": "zeta.backends.llama_cpp:open_backend",
}


def get_backend(name: str) -> BackendFactory:
    """Return the factory for backend ``name``, importing its module now."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend {name!r}; known: {sorted(BACKENDS)}", key="backend"
        ) from None
    module, _, attr = target.partition(":")
    factory: BackendFactory = getattr(importlib.import_module(module), attr)
    return factory
