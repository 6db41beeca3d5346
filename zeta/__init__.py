"""zeta: load-aware scheduling of LLM requests across several local llama.cpp models."""

from __future__ import annotations

from ._exceptions import ActorDead as ActorDead
from ._exceptions import BackendError as BackendError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import DeadlineExceeded as DeadlineExceeded
from ._exceptions import InvalidInputError as InvalidInputError
from ._exceptions import InvalidRequestError as InvalidRequestError
from ._exceptions import KernelInputError as KernelInputError
from ._exceptions import ModelLoadError as ModelLoadError
from ._exceptions import ModelUnavailable as ModelUnavailable
from ._exceptions import NoCapableModelError as NoCapableModelError
from ._exceptions import Overloaded as Overloaded
from ._exceptions import SchedulerClosed as SchedulerClosed
from ._exceptions import TryAgainError as TryAgainError
from ._exceptions import ZetaError as ZetaError
from ._scoring import IMPLEMENTATION as _KERNEL
from ._types import Kind as Kind
from ._types import ModelSpec as ModelSpec
from ._types import Priority as Priority

__version__ = "0.1.0"


def kernel_implementation() -> str:
    """Which scoring kernel is active: ``"c"`` (compiled) or ``"py"`` (``ZETA_NO_EXTENSIONS=1``)."""
    return _KERNEL


__all__ = (
    "ActorDead",
    "BackendError",
    "ConfigError",
    "DeadlineExceeded",
    "InvalidInputError",
    "InvalidRequestError",
    "Kind",
    "KernelInputError",
    "ModelLoadError",
    "ModelSpec",
    "ModelUnavailable",
    "NoCapableModelError",
    "Overloaded",
    "Priority",
    "SchedulerClosed",
    "TryAgainError",
    "ZetaError",
    "__version__",
    "kernel_implementation",
)
