"""The public surface of ``zeta``: exactly these names, all importable, nothing private leaking."""

from __future__ import annotations

import inspect

import zeta
import zeta.telemetry
import zeta.testing

PUBLIC = (
    "ActorDead",
    "ActorState",
    "BackendError",
    "CalibrationView",
    "Calibrator",
    "Candidate",
    "ChatOptions",
    "ChatResult",
    "ChatTemplateError",
    "Classification",
    "Classifier",
    "CompletionOptions",
    "CompletionResult",
    "Config",
    "ConfigError",
    "ContextWindowExceeded",
    "DeadlineExceeded",
    "DynamicPolicy",
    "EmbeddingResult",
    "HeuristicClassifier",
    "InvalidInputError",
    "InvalidRequestError",
    "JoinShortestQueuePolicy",
    "KernelInputError",
    "Kind",
    "MetricsConfig",
    "ModelLoadError",
    "ModelSnapshot",
    "ModelSpec",
    "ModelUnavailable",
    "NoCapableModelError",
    "Outcome",
    "Overloaded",
    "PeakEwmaPolicy",
    "Policy",
    "PowerOfTwoChoicesPolicy",
    "Priority",
    "Recorder",
    "RequestOptions",
    "RoundRobinPolicy",
    "RouteRequest",
    "Scheduler",
    "SchedulerClosed",
    "SchedulerSnapshot",
    "Scoring",
    "ServeConfig",
    "ServicePrior",
    "StaticPolicy",
    "Supervision",
    "ThresholdPolicy",
    "TokenStream",
    "ToolCall",
    "TryAgainError",
    "UnknownModelError",
    "ZetaError",
    "__version__",
    "kernel_implementation",
    "load_config",
)


def test_all_is_pinned() -> None:
    assert isinstance(zeta.__all__, tuple)
    assert zeta.__all__ == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in zeta.__all__:
        assert getattr(zeta, name) is not None, name


def test_public_classes_say_they_live_in_zeta_modules() -> None:
    for name in zeta.__all__:
        obj = getattr(zeta, name)
        if isinstance(obj, type):
            assert obj.__module__.startswith("zeta."), (name, obj.__module__)


def test_errors_tell_retry_from_invalid_input() -> None:
    retry = (zeta.Overloaded, zeta.ModelUnavailable, zeta.ActorDead, zeta.DeadlineExceeded)
    for cls in retry:
        assert issubclass(cls, zeta.TryAgainError)
    for cls in (zeta.InvalidRequestError, zeta.NoCapableModelError, zeta.ConfigError):
        assert issubclass(cls, zeta.InvalidInputError)
    for cls in (*retry, zeta.SchedulerClosed, zeta.BackendError, zeta.ModelLoadError):
        assert issubclass(cls, zeta.ZetaError)


def test_each_name_is_exported_once() -> None:
    """A name is public in one place: ``zeta``, ``zeta.telemetry`` or ``zeta.testing``."""
    seen: dict[int, str] = {}
    for module in (zeta, zeta.telemetry, zeta.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) or callable(obj):
                where = f"{module.__name__}.{name}"
                assert id(obj) not in seen, f"{where} is also {seen[id(obj)]}"
                seen[id(obj)] = where


def test_public_signatures_use_only_public_defaults() -> None:
    """No default value in a public signature is of a zeta type the user cannot name."""
    public_types = {getattr(zeta, n) for n in zeta.__all__ if isinstance(getattr(zeta, n), type)}
    for name in zeta.__all__:
        obj = getattr(zeta, name)
        members = [obj]
        if isinstance(obj, type):
            members += [m for k, m in vars(obj).items() if callable(m) and not k.startswith("_")]
            members.append(obj.__init__)
        for member in members:
            try:
                signature = inspect.signature(member)
            except (TypeError, ValueError):
                continue
            for param in signature.parameters.values():
                default = param.default
                if default is inspect.Parameter.empty:
                    continue
                kind = type(default)
                private = kind.__module__.split(".")[0] == "zeta" and kind not in public_types
                assert not private, (name, param.name, kind)
