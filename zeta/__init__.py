"""zeta: load-aware scheduling of LLM requests across several local llama.cpp models."""

from __future__ import annotations

from ._calibration import CalibrationView as CalibrationView
from ._calibration import Calibrator as Calibrator
from ._chat import ChatResult as ChatResult
from ._chat import ToolCall as ToolCall
from ._classifier import Classification as Classification
from ._classifier import Classifier as Classifier
from ._classifier import HeuristicClassifier as HeuristicClassifier
from ._config import Config as Config
from ._config import MetricsConfig as MetricsConfig
from ._config import ServeConfig as ServeConfig
from ._config import load_config as load_config
from ._exceptions import ActorDead as ActorDead
from ._exceptions import BackendError as BackendError
from ._exceptions import ChatTemplateError as ChatTemplateError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import ContextWindowExceeded as ContextWindowExceeded
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
from ._exceptions import UnknownModelError as UnknownModelError
from ._exceptions import ZetaError as ZetaError
from ._intake import ChatOptions as ChatOptions
from ._intake import CompletionOptions as CompletionOptions
from ._intake import RequestOptions as RequestOptions
from ._policies import Candidate as Candidate
from ._policies import DynamicPolicy as DynamicPolicy
from ._policies import JoinShortestQueuePolicy as JoinShortestQueuePolicy
from ._policies import PeakEwmaPolicy as PeakEwmaPolicy
from ._policies import Policy as Policy
from ._policies import PowerOfTwoChoicesPolicy as PowerOfTwoChoicesPolicy
from ._policies import RoundRobinPolicy as RoundRobinPolicy
from ._policies import RouteRequest as RouteRequest
from ._policies import StaticPolicy as StaticPolicy
from ._policies import ThresholdPolicy as ThresholdPolicy
from ._request import CompletionResult as CompletionResult
from ._request import EmbeddingResult as EmbeddingResult
from ._scheduler import Scheduler as Scheduler
from ._scoring import IMPLEMENTATION as _KERNEL
from ._snapshot import ActorState as ActorState
from ._snapshot import ModelSnapshot as ModelSnapshot
from ._snapshot import SchedulerSnapshot as SchedulerSnapshot
from ._stream import TokenStream as TokenStream
from ._supervisor import Supervision as Supervision
from ._types import Kind as Kind
from ._types import ModelSpec as ModelSpec
from ._types import Priority as Priority
from ._types import Scoring as Scoring
from ._types import ServicePrior as ServicePrior
from .telemetry._recorder import Outcome as Outcome
from .telemetry._recorder import Recorder as Recorder

__version__ = "0.1.0"


def kernel_implementation() -> str:
    """Which scoring kernel is active: ``"c"`` (compiled) or ``"py"`` (``ZETA_NO_EXTENSIONS=1``)."""
    return _KERNEL


__all__ = (
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
