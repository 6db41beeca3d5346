"""The public surface of ``zeta``: exactly these names, all importable, nothing private leaking."""

from __future__ import annotations

import zeta

PUBLIC = (
    "ActorDead",
    "ActorState",
    "BackendError",
    "CalibrationView",
    "Calibrator",
    "Candidate",
    "Classification",
    "Classifier",
    "CompletionResult",
    "Config",
    "ConfigError",
    "DeadlineExceeded",
    "DynamicPolicy",
    "EmbeddingResult",
    "HeuristicClassifier",
    "InvalidInputError",
    "InvalidRequestError",
    "JoinShortestQueuePolicy",
    "Kind",
    "KernelInputError",
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
    "RoundRobinPolicy",
    "RouteRequest",
    "Scheduler",
    "SchedulerClosed",
    "SchedulerSnapshot",
    "StaticPolicy",
    "Supervision",
    "ThresholdPolicy",
    "TokenStream",
    "TryAgainError",
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
