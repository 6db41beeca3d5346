"""Core value types: request kinds, priorities, model specs and the routing parameters.

Each value validates itself where it is defined (``__post_init__``), raising
:class:`~zeta.ConfigError` naming the field; the config file layer only maps its keys onto these
fields and prefixes the key path (:meth:`ConfigError.under <zeta.ConfigError.under>`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._exceptions import ConfigError


class Kind(enum.StrEnum):
    """What a request asks for. ``AUTO`` requests are classified by the router."""

    SIMPLE = "simple"
    CODE = "code"
    EMBED = "embed"
    REASON = "reason"
    AUTO = "auto"


#: Kinds a model can serve, in the column order the scoring kernel uses.
SERVED_KINDS: tuple[Kind, ...] = (Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON)
KIND_INDEX: dict[Kind, int] = {k: i for i, k in enumerate(SERVED_KINDS)}


class Priority(enum.IntEnum):
    """Priority class of a request; a lower value is served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


# --------------------------------------------------------------------------------------------
# Checks shared by the self-validating values (ModelSpec, Scoring, Supervision) and the config
# file's own keys. Each raises ConfigError with ``key`` set to the name it is given.

_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean", int: "an integer", float: "a float", str: "a string",
    list: "an array", dict: "a table", type(None): "None",
}  # fmt: skip


def type_name(value: object) -> str:
    """How an error message names the type of ``value`` (TOML's words for TOML's types)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def shown(value: object) -> str:
    """``value`` as an error message shows it: short, and never failing.

    Numbers and strings appear as themselves (cut to 40 characters); anything else by its type. A
    huge integer is described, not printed: Python refuses to convert one of more than 4300 digits
    to text.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return type_name(value)
    if isinstance(value, int) and abs(value) >= 10**18:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_int(value: object, key: str, low: int, high: int) -> int:
    """``value`` if it is an integer (not a boolean) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {type_name(value)}", key=key)
    if not low <= value <= high:
        raise ConfigError(f"must be between {low} and {high}, got {shown(value)}", key=key)
    return int(value)


def check_number(
    value: object, key: str, low: float, high: float, *, low_open: bool = False
) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]`` (``(low, high]`` with
    ``low_open``); huge integers and non-finite floats are rejected, never overflow."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"must be a number, got {type_name(value)}", key=key)
    if not (_finite_at_most(value, high) and (value > low if low_open else value >= low)):
        raise ConfigError(
            f"must be a finite number {'>' if low_open else '>='} {low:g} and <= {high:g}, "
            f"got {shown(value)}",
            key=key,
        )
    return float(value)


def parse_kinds(value: object, key: str) -> frozenset[Kind]:
    """The kinds named by ``value``, a collection of kind names or :class:`Kind` members.

    ``"auto"`` is a request kind, not one a model serves, so it is rejected.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ConfigError(f"must be an array of kinds, got {type_name(value)}", key=key)
    out = set()
    for item in value:
        try:
            kind = Kind(item)
        except (ValueError, TypeError):
            names = [k.value for k in SERVED_KINDS]
            raise ConfigError(
                f"unknown kind {shown(item)}; expected one of {names}", key=key
            ) from None
        if kind is Kind.AUTO:
            raise ConfigError("'auto' is a request kind, not one a model serves", key=key)
        out.add(kind)
    return frozenset(out)


# --------------------------------------------------------------------------------------------

#: Inclusive ranges of :class:`ModelSpec`'s integer fields. The upper bounds are far beyond any
#: real deployment and keep every value inside the C types llama.cpp stores it in.
MODEL_INT_RANGES: Mapping[str, tuple[int, int]] = {
    "quality": (0, 1000),
    "replicas": (1, 64),
    "slots": (1, 256),
    "n_ctx": (16, 2**24),
    "n_threads": (1, 1024),
    "n_gpu_layers": (-1, 10_000),
    "device": (0, 1024),
}

#: How many requests one context decodes together unless a model says otherwise.
DEFAULT_SLOTS = 4

#: The longest model (and backend) name, in characters.
MAX_NAME_LENGTH = 128


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model zeta schedules onto.

    The one validator of these fields: a bad value raises :class:`~zeta.ConfigError` whose
    ``key`` is the field's name, at construction. Integer fields take integers only (no booleans,
    no floats) within the ranges of :data:`MODEL_INT_RANGES`.

    Args:
        name: unique name, used in logs, metrics and snapshots; printable, at most
            :data:`MAX_NAME_LENGTH` characters.
        path: GGUF file (a string or path-like; the config loader resolves it against the config
            file's directory, or to a ladder model); ``None`` for simulated backends.
        kinds: kinds this model can serve at all (kind names or :class:`Kind` members), at least
            one.
        preferred: kinds it is meant for, a subset of ``kinds`` (empty: all of them); serving any
            other capable kind costs ``spill_penalty``.
        quality: quality rank, 0 is best, up to 1000; each rank adds ``quality_penalty`` seconds
            of cost.
        replicas: how many independent contexts (actors) to run, 1 to 64.
        slots: how many requests one context decodes together (continuous batching), 1 to 256;
            default :data:`DEFAULT_SLOTS`. ``1`` serves one request at a time. Each slot has its
            own ``n_ctx`` tokens of KV cache, so a context's KV memory grows with its slots.
        n_ctx: context length of one request (a slot) in tokens, 16 to 2**24 (16,777,216): its
            prompt plus ``max_tokens`` must fit.
        n_threads: CPU threads per context, 1 to 1024.
        n_gpu_layers: layers to offload to the GPU, 0 to 10000, or -1 for all of them.
        device: GPU index (0 to 1024) the model's layers live on, ``None`` for the CPU.
        backend: backend name (``"llama_cpp"`` or ``"simulated"``); the name is looked up when
            the scheduler is built (the config loader checks it up front).
        options: backend-specific options, a mapping with string keys (the backend checks the
            values when it opens the model).
        optional: whether the scheduler may start without this model when its file fails to
            load (:class:`~zeta.ModelLoadError`). Its actors are then ``DOWN`` (routed around and
            probed until the file loads) instead of the whole scheduler refusing to start.
    """

    name: str
    path: str | None = None
    kinds: frozenset[Kind] = frozenset(SERVED_KINDS)
    preferred: frozenset[Kind] = frozenset()
    quality: int = 0
    replicas: int = 1
    slots: int = 4
    n_ctx: int = 2048
    n_threads: int = 1
    n_gpu_layers: int = 0
    device: int | None = None
    backend: str = "llama_cpp"
    options: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    optional: bool = False

    def __post_init__(self) -> None:
        if not _is_name(self.name):
            raise ConfigError(
                f"must be a non-empty printable string of at most {MAX_NAME_LENGTH} characters, "
                f"got {_shown_str(self.name)}",
                key="name",
            )
        path: object = self.path
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if path is not None and (not isinstance(path, str) or not path or "\0" in path):
            raise ConfigError(
                f"must be a non-empty file path without NUL characters, or absent; "
                f"got {_shown_str(path)}",
                key="path",
            )
        object.__setattr__(self, "path", path)
        kinds = parse_kinds(self.kinds, "kinds")
        if not kinds:
            raise ConfigError("a model must serve at least one kind", key="kinds")
        preferred = parse_kinds(self.preferred, "preferred") or kinds
        if not preferred <= kinds:
            extra = sorted(k.value for k in preferred - kinds)
            raise ConfigError(f"preferred kinds {extra} are not served", key="preferred")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "preferred", preferred)
        for attr, (low, high) in MODEL_INT_RANGES.items():
            value = getattr(self, attr)
            if not (attr == "device" and value is None):
                object.__setattr__(self, attr, check_int(value, attr, low, high))
        if not _is_name(self.backend):
            raise ConfigError(
                f"must be a backend name, got {_shown_str(self.backend)}", key="backend"
            )
        options: object = self.options
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise ConfigError(
                f"must be a table of named options, got {type_name(options)}", key="options"
            )
        if not isinstance(options, dict):
            object.__setattr__(self, "options", dict(options))
        if not isinstance(self.optional, bool):
            raise ConfigError(
                f"must be true or false, got {type_name(self.optional)}", key="optional"
            )

    @property
    def file(self) -> Path | None:
        """The model file as a path, if any."""
        return Path(self.path) if self.path else None


def _shown_str(value: object) -> str:
    """A bad value of a string field: a string as itself, anything else by its type."""
    return shown(value) if isinstance(value, str) else type_name(value)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH and value.isprintable()


@dataclass(frozen=True, slots=True)
class Scoring:
    """The scoring kernel's parameters: exactly the values a calibrator may change.

    Args:
        tau: time constant (seconds) of the peak-EWMA latency estimates; a slower sample replaces
            an estimate at once, faster ones decay it with this time constant. ``> 0``.
        contention_weight: weight of device utilisation in the expected slowdown. ``>= 0``.
        spill_penalty: seconds added for serving a kind the model does not prefer. ``>= 0``.
        quality_penalty: seconds added per quality rank below the best. ``>= 0``.
        harm_weight: weight of the delay a request adds to the requests already running on the
            model it is sent to and on the models sharing its device. ``>= 0``; ``0`` routes
            each request for its own completion only.
        co_slow: how much slower a model's decoding steps run per other busy model on its
            device (relative; every model gets this value). Measured: about 0.24 to 0.94 for
            three models on an H100; on two CPU cores about 1.0 for two-thread models and
            0.0-0.13 for one-thread models beside one other. ``0`` to :data:`MAX_CO_SLOW`.

    Every field is a finite number no larger than :data:`MAX_SCORING_VALUE` (``co_slow``: no
    larger than :data:`MAX_CO_SLOW`).
    """

    tau: float = 5.0
    contention_weight: float = 1.0
    spill_penalty: float = 1.0
    quality_penalty: float = 0.25
    harm_weight: float = 1.0
    co_slow: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            high = MAX_CO_SLOW if f.name == "co_slow" else MAX_SCORING_VALUE
            value = check_number(getattr(self, f.name), f.name, 0.0, high, low_open=f.name == "tau")
            object.__setattr__(self, f.name, value)

    def replace(self, changes: Mapping[str, object]) -> Scoring:
        """A copy with some fields changed (validated).

        Raises:
            ConfigError: an unknown field, or a value out of range.
        """
        for key in changes:
            if key not in SCORING_FIELDS:
                raise ConfigError(f"unknown parameter; tunable: {list(SCORING_FIELDS)}", key=key)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SCORING_FIELDS}


@dataclass(frozen=True, slots=True)
class ServicePrior:
    """What a model's service is expected to be before any request has been observed (from a
    measured profile: :meth:`zeta.sim.Fleet.priors`, written by ``zeta profile``).

    Args:
        first_token_s: seconds to the first token of a typical request, alone.
        token_s: seconds per generated token with one sequence in the context.
        step_slope: the step time's growth per extra busy sequence (``None``: the kernel's
            default).
        co_slow: the step time's growth per other busy model on its device (``None``: the
            scoring parameter's value).

    Raises:
        ConfigError: naming the field.
    """

    first_token_s: float
    token_s: float
    step_slope: float | None = None
    co_slow: float | None = None

    def __post_init__(self) -> None:
        for key in ("first_token_s", "token_s"):
            object.__setattr__(self, key, check_number(getattr(self, key), key, 0.0, 1e6))
        if self.step_slope is not None:
            object.__setattr__(
                self,
                "step_slope",
                check_number(self.step_slope, "step_slope", 0.0, MAX_STEP_SLOPE),
            )
        if self.co_slow is not None:
            object.__setattr__(
                self, "co_slow", check_number(self.co_slow, "co_slow", 0.0, MAX_CO_SLOW)
            )


#: The largest value a scoring parameter may take (seconds or a weight): far above any sensible
#: setting, and small enough that costs computed from it stay finite.
MAX_SCORING_VALUE = 1e6

#: The largest ``co_slow``: each other busy model on a device makes a step 11 times slower. The
#: scoring kernel's own bound (``zeta._scoring_py.MAX_CO_SLOW``), checked here first.
MAX_CO_SLOW = 10.0
#: The largest step slope (a step with ``k`` busy sequences takes ``1 + slope * (k - 1)`` times
#: one): the scoring kernel's own bound (``zeta._scoring_py.MAX_STEP_SLOPE``), checked here first.
MAX_STEP_SLOPE = 10.0

#: The tunable parameters, in order: the fields of :class:`Scoring`.
SCORING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Scoring))


def _finite_at_most(value: int | float, high: float) -> bool:
    """``value`` is finite and ``<= high``, without overflowing on a huge int."""
    try:
        return math.isfinite(value) and value <= high
    except OverflowError:
        return False
