"""zeta's exception hierarchy.

Every error zeta raises derives from :class:`ZetaError`. Two families tell the caller what to do:
:class:`TryAgainError` ("the system is busy or broken right now, retry later") and
:class:`InvalidInputError` ("your input or configuration is wrong, retrying will not help").
"""

from __future__ import annotations


class ZetaError(Exception):
    """Root of every exception zeta raises."""


class TryAgainError(ZetaError):
    """The request was fine but could not be served now; a retry may succeed."""


class InvalidInputError(ZetaError, ValueError):
    """The caller's input or configuration is wrong; retrying the same thing will fail again."""


class ConfigError(InvalidInputError):
    """Raised when building a :class:`~zeta.ModelSpec`, a policy or a config file with invalid values.

    ``key`` names the offending field or key path (``n_ctx``, ``models[1].n_ctx``) and
    ``message`` the problem; ``str(error)`` is ``"key: message"``.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.message = message
        self.key = key

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under ``prefix`` (``models[1]`` + ``n_ctx`` gives
        ``models[1].n_ctx``); what a loader raises for a value it handed on to be validated.
        """
        return ConfigError(self.message, key=f"{prefix}.{self.key}" if self.key else prefix)


class InvalidRequestError(InvalidInputError):
    """Raised by the scheduler's public methods when a request is malformed.

    Examples: an empty prompt, ``max_tokens < 1``, an unknown kind, a deadline in the past.
    """


class ContextWindowExceeded(InvalidRequestError):
    """Raised when a request's prompt plus ``max_tokens`` does not fit the context of one slot
    of the model it was routed to (``ModelSpec.n_ctx``), before it runs. ``model``,
    ``n_ctx``, ``prompt_tokens`` and ``max_tokens`` say by how much (OpenAI's
    ``context_length_exceeded``).
    """

    def __init__(
        self, message: str, *, model: str, n_ctx: int, prompt_tokens: int, max_tokens: int
    ) -> None:
        super().__init__(message)
        self.model = model
        self.n_ctx = n_ctx
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class ChatTemplateError(InvalidRequestError):
    """Raised by :meth:`Scheduler.chat <zeta.Scheduler.chat>` and
    :meth:`~zeta.Scheduler.chat_stream` when the chat template of the model the request was
    routed to cannot render its messages: the template raised (many refuse a conversation whose
    roles do not alternate), tried something the sandbox forbids, ran past the sandbox's time or
    size limits, or does not compile. ``model`` names the model.
    """

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        self.model = model


class UnknownModelError(InvalidRequestError):
    """Raised by the scheduler's public methods when the ``model=`` option names no configured
    model (the HTTP server answers 404)."""


class KernelInputError(InvalidInputError):
    """Raised by the scoring kernel for NaN, negative or infinite inputs or mismatched arrays."""


class NoCapableModelError(InvalidInputError):
    """Raised when no configured model can serve the request's kind at all, or the model that
    ``model=`` pins the request to does not serve it."""


class ModelLoadError(ZetaError):
    """Raised when a model file cannot be loaded (missing, empty, truncated, wrong format).

    ``path`` names the file.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class Overloaded(TryAgainError):
    """Raised at admission when every capable model's mailbox is full.

    ``retry_after`` is a hint in seconds, from the current queue and service-time estimates.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(f"{message} (retry after {retry_after:.3f}s)")
        self.retry_after = retry_after


class ActorDead(TryAgainError):
    """Raised when the actor serving a request died and no other capable model could take it."""


class ModelUnavailable(TryAgainError):
    """Raised when every model the policy may use for a request is down (crashed too often, or
    an optional model that failed to load); the supervisor probes them, so a retry may succeed.
    """


class DeadlineExceeded(TryAgainError):
    """Raised when a request's deadline passes before it finished (queued requests never run)."""


class BackendError(ZetaError):
    """Raised when a backend call failed for a reason other than the model being dead."""


class SchedulerClosed(ZetaError):
    """Raised when a request is submitted to, or still pending in, a scheduler that is shutting down."""
