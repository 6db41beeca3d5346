"""Service models: how long a model takes, per call, per prompt token and per decode step.

A :class:`ServiceProfile` holds what a profiling run (``zeta profile``) measures of one model
on its device: the per-call overhead, prefill time per prompt token, the decode step time for
each number of busy slots ``1..slots``, and the slowdown while other models on the same device
are busy. A
:class:`SimModel` pairs it with the :class:`~zeta.ModelSpec` the router sees; a :class:`Fleet`
is the models of one host plus how many "lanes" each device has (what its utilisation reading
saturates at). :func:`ladder_fleet` mirrors the generated CPU ladder, :func:`gpu_fleet` three
models sharing one GPU with the contention measured on an H100.

The dict form (what :meth:`Fleet.from_dict` reads and :meth:`Fleet.to_dict` writes, and a TOML
file for :func:`load_fleet` holds)::

    [devices]
    cpu = { lanes = 2 }          # a key is "cpu" or a GPU index ("0"); lanes default 1

    [[models]]
    name = "coder"
    kinds = ["simple", "code", "reason"]
    preferred = ["simple", "code"]
    quality = 1
    device = "cpu"               # or a GPU index; default "cpu"
    replicas = 1
    call_s = 0.002               # per-call overhead, seconds
    prefill_token_s = 0.0004     # per prompt token
    step_s = [0.0032, 0.0041]    # decode step with 1, 2, ... slots busy (its length is the slots)
    coload = [1.0, 1.15, 1.6]    # step-time factor with 0, 1, 2, ... other models busy on the device
    jitter = 0.1                 # relative, per request: uniform in [1 - jitter, 1 + jitter]
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from .._exceptions import ConfigError
from .._types import (
    MAX_CO_SLOW,
    MAX_STEP_SLOPE,
    SERVED_KINDS,
    Kind,
    ModelSpec,
    ServicePrior,
    check_int,
    check_number,
)

__all__ = [
    "Device",
    "Fleet",
    "ServiceProfile",
    "SimModel",
    "gpu_fleet",
    "ladder_fleet",
    "linear_steps",
    "load_fleet",
]

#: Where a model runs: ``None`` for the host CPU, else a GPU index (as :attr:`ModelSpec.device`).
Device = int | None

_MAX_S = 1e6


def _seconds(values: object, key: str, *, low: float = 0.0) -> tuple[float, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ConfigError("must be a non-empty array of numbers", key=key)
    return tuple(check_number(v, key, low, _MAX_S) for v in values)


@dataclass(frozen=True, slots=True)
class ServiceProfile:
    """One model's measured service times on its device (seconds).

    A request costs ``call_s + prefill_token_s * prompt_tokens`` to start (its prefill, which
    holds up the decoding of the others in the context), then one decode step per output token.
    A step with ``k`` sequences busy takes ``step_s[k - 1]`` and gives each of them one token.
    While ``j`` other models on the same device are busy, prefill and steps take ``coload[j]``
    times as long (the last entry for any larger ``j``).

    Args:
        call_s: per-call overhead.
        prefill_token_s: prefill time per prompt token.
        step_s: decode step time with ``1..slots`` busy sequences; its length is the slots.
        coload: slowdown with ``0, 1, ...`` other models busy on the device; ``coload[0]`` is 1.
        jitter: relative per-request jitter of prefill and decode, ``[0, 1)``.
    """

    call_s: float
    prefill_token_s: float
    step_s: tuple[float, ...]
    coload: tuple[float, ...] = (1.0,)
    jitter: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "call_s", check_number(self.call_s, "call_s", 0.0, _MAX_S))
        object.__setattr__(
            self,
            "prefill_token_s",
            check_number(self.prefill_token_s, "prefill_token_s", 0.0, _MAX_S),
        )
        step = _seconds(self.step_s, "step_s")
        if len(step) > 256:
            raise ConfigError("at most 256 slots", key="step_s")
        if step[0] <= 0.0:
            raise ConfigError("a step with one sequence must take some time", key="step_s")
        object.__setattr__(self, "step_s", step)
        coload = _seconds(self.coload, "coload", low=1.0)
        if coload[0] != 1.0:
            raise ConfigError("coload[0] (no other model busy) must be 1", key="coload")
        object.__setattr__(self, "coload", coload)
        jitter = check_number(self.jitter, "jitter", 0.0, 1.0)
        if jitter >= 1.0:
            raise ConfigError("must be below 1", key="jitter")
        object.__setattr__(self, "jitter", jitter)

    @property
    def slots(self) -> int:
        """Sequences one context decodes together."""
        return len(self.step_s)

    def prefill(self, prompt_tokens: int) -> float:
        """Seconds to start a request of ``prompt_tokens`` with the device to itself."""
        return self.call_s + self.prefill_token_s * prompt_tokens

    def service(self, prompt_tokens: int, output_tokens: int, busy: int = 1) -> float:
        """Seconds for one request alone on the device, decoding beside ``busy - 1`` others."""
        k = min(max(1, busy), self.slots)
        return self.prefill(prompt_tokens) + output_tokens * self.step_s[k - 1]

    def full_batch_s(self, prompt_tokens: float, output_tokens: float) -> float:
        """Context time one request uses at full occupancy: its prefill plus its share of the
        steps of a full batch. Its inverse is the most requests per second the model serves."""
        return (
            self.call_s
            + self.prefill_token_s * prompt_tokens
            + output_tokens * self.step_s[-1] / self.slots
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_s": self.call_s,
            "prefill_token_s": self.prefill_token_s,
            "step_s": list(self.step_s),
            "coload": list(self.coload),
            "jitter": self.jitter,
        }


def linear_steps(one: float, slope: float, slots: int) -> tuple[float, ...]:
    """Step times ``one * (1 + slope * (k - 1))`` for ``k = 1..slots`` (the kernel's ``g(k)``)."""
    return tuple(one * (1.0 + slope * k) for k in range(slots))


@dataclass(frozen=True, slots=True)
class SimModel:
    """A model as the router sees it (``spec``) and as it performs (``profile``).

    ``spec.slots`` must equal ``profile.slots``; ``spec.device`` places it.
    """

    spec: ModelSpec
    profile: ServiceProfile

    def __post_init__(self) -> None:
        if self.spec.slots != self.profile.slots:
            raise ConfigError(
                f"the spec has {self.spec.slots} slots, the profile's step_s {self.profile.slots}",
                key="slots",
            )

    @property
    def name(self) -> str:
        return self.spec.name


def _device_key(device: Device) -> str:
    return "cpu" if device is None else str(device)


def _parse_device(value: object, key: str) -> Device:
    if value is None or value == "cpu":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return check_int(value, key, 0, 1024)


@dataclass(frozen=True, slots=True)
class Fleet:
    """The models of one host and their devices.

    Args:
        models: at least one, unique names.
        lanes: per device, how many models can be busy before its utilisation reading saturates
            (the host CPU's cores over threads per model; 1 for a GPU, whose reading is the share
            of time any kernel runs). Devices not named have 1.
    """

    models: tuple[SimModel, ...]
    lanes: Mapping[Device, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        models = tuple(self.models)
        if not models or not all(isinstance(m, SimModel) for m in models):
            raise ConfigError("at least one SimModel is needed", key="models")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique: {names}", key="models")
        object.__setattr__(self, "models", models)
        object.__setattr__(
            self,
            "lanes",
            {d: check_number(v, f"devices.{_device_key(d)}.lanes", 0.0, 1e6, low_open=True)
             for d, v in self.lanes.items()},
        )  # fmt: skip

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        return tuple(m.spec for m in self.models)

    def lanes_of(self, device: Device) -> float:
        return self.lanes.get(device, 1.0)

    def model(self, name: str) -> SimModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fleet:
        """A fleet from its dict form (see the module docstring).

        Raises:
            ConfigError: naming the key path of a bad value.
        """
        devices = data.get("devices", {})
        if not isinstance(devices, Mapping):
            raise ConfigError("must be a table", key="devices")
        lanes: dict[Device, float] = {}
        for name, table in devices.items():
            if not isinstance(table, Mapping):
                raise ConfigError("must be a table", key=f"devices.{name}")
            lanes[_parse_device(name, f"devices.{name}")] = table.get("lanes", 1.0)
        items = data.get("models")
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise ConfigError("must be an array of tables", key="models")
        models = []
        profile_keys = ("call_s", "prefill_token_s", "step_s", "coload", "jitter")
        for n, item in enumerate(items):
            where = f"models[{n}]"
            if not isinstance(item, Mapping):
                raise ConfigError("must be a table", key=where)
            try:
                profile = ServiceProfile(**{k: item[k] for k in profile_keys if k in item})
                spec = ModelSpec(
                    name=item.get("name"),  # type: ignore[arg-type]
                    kinds=item.get("kinds", SERVED_KINDS),
                    preferred=item.get("preferred", ()),
                    quality=item.get("quality", 0),
                    replicas=item.get("replicas", 1),
                    slots=profile.slots,
                    device=_parse_device(item.get("device"), "device"),
                    backend="simulated",
                )
                models.append(SimModel(spec, profile))
            except ConfigError as exc:
                raise exc.under(where) from None
            except TypeError as exc:  # a missing required profile field
                raise ConfigError(str(exc), key=where) from None
        return cls(tuple(models), lanes)

    def priors(self, prompt_tokens: int = 64) -> dict[str, ServicePrior]:
        """Each model's profile as the scheduler's priors (``Scheduler(priors=...)``): the first
        token of a ``prompt_tokens`` request, the one-sequence step, the step's growth per
        extra busy sequence (a straight line through ``step_s``) and per other busy model on
        its device (``coload[1] - 1``)."""
        out: dict[str, ServicePrior] = {}
        for m in self.models:
            p = m.profile
            step = p.step_s
            slope = (step[-1] / step[0] - 1.0) / (len(step) - 1) if len(step) > 1 else 0.0
            co = min(p.coload[1] - 1.0, MAX_CO_SLOW) if len(p.coload) > 1 else None
            out[m.name] = ServicePrior(
                p.prefill(prompt_tokens), step[0], min(max(slope, 0.0), MAX_STEP_SLOPE), co
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The dict form; ``Fleet.from_dict(f.to_dict()) == f``."""
        return {
            "devices": {_device_key(d): {"lanes": v} for d, v in self.lanes.items()},
            "models": [
                {
                    "name": m.spec.name,
                    "kinds": sorted(k.value for k in m.spec.kinds),
                    "preferred": sorted(k.value for k in m.spec.preferred),
                    "quality": m.spec.quality,
                    "replicas": m.spec.replicas,
                    "device": _device_key(m.spec.device),
                    **m.profile.to_dict(),
                }
                for m in self.models
            ],
        }


def load_fleet(path: str | PathLike[str]) -> Fleet:
    """A fleet from a TOML file in the dict form."""
    with open(path, "rb") as f:
        return Fleet.from_dict(tomllib.load(f))


# -- shipped fleets -----------------------------------------------------------------------------
_CODER_KINDS = frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON})


def _model(
    name: str,
    kinds: frozenset[Kind],
    preferred: frozenset[Kind],
    quality: int,
    device: Device,
    profile: ServiceProfile,
) -> SimModel:
    spec = ModelSpec(
        name,
        kinds=kinds,
        preferred=preferred,
        quality=quality,
        slots=profile.slots,
        device=device,
        backend="simulated",
    )
    return SimModel(spec, profile)


#: Slowdown on the 2-core host with 0, 1, 2 other single-threaded models busy: two share memory
#: bandwidth; three share two cores.
CPU_COLOAD = (1.0, 1.15, 1.6)


def ladder_fleet(*, slots: int = 8, jitter: float = 0.1) -> Fleet:
    """The generated ladder on one 2-core CPU: embedder, coder and reasoner, one thread each.

    Decode at one sequence: 0.8, 3.2 and 14 ms per token (measured on the ladder); prefill at an
    eighth of that per prompt token (the embedder's 0.7 ms covers its pooling). Step time grows
    by 0.28 (coder) and 0.1 (reasoner) of the single step per extra busy sequence, so 8 busy
    sequences take 3x and 1.7x one step (``bench llama``: 3x and 4.5x the tokens/s of one slot).
    """
    return Fleet(
        (
            _model(
                "embedder",
                frozenset({Kind.EMBED}),
                frozenset({Kind.EMBED}),
                0,
                None,
                ServiceProfile(0.002, 0.0007, linear_steps(0.0008, 0.2, slots), CPU_COLOAD, jitter),
            ),
            _model(
                "coder",
                _CODER_KINDS,
                frozenset({Kind.SIMPLE, Kind.CODE}),
                1,
                None,
                ServiceProfile(
                    0.002, 0.0004, linear_steps(0.0032, 0.28, slots), CPU_COLOAD, jitter
                ),
            ),
            _model(
                "reasoner",
                _CODER_KINDS,
                frozenset({Kind.REASON}),
                0,
                None,
                ServiceProfile(0.002, 0.00175, linear_steps(0.014, 0.1, slots), CPU_COLOAD, jitter),
            ),
        ),
        {None: 2.0},
    )


def gpu_fleet(*, slots: int = 8, jitter: float = 0.05) -> Fleet:
    """Three models on one GPU (device 0), with the contention measured on an H100.

    Decoding alone took 2.07, 3.69 and 5.82 ms per token, and all three at once 5.96, 8.02 and
    8.60 ms: slowdowns of 2.88x, 2.17x and 1.48x with two others busy (half that excess with
    one). The smallest serves embeddings, the middle one code, the largest reasoning. Batching
    is nearly free on a GPU (a step with 8 busy takes 1.2x one); prefill runs at a fortieth of a
    decode step per token.
    """

    def coload(both: float) -> tuple[float, ...]:
        return (1.0, 1.0 + (both - 1.0) / 2.0, both)

    def profile(step: float, both: float) -> ServiceProfile:
        return ServiceProfile(
            0.001, step / 40.0, linear_steps(step, 0.03, slots), coload(both), jitter
        )

    return Fleet(
        (
            _model(
                "embedder", frozenset({Kind.EMBED}), frozenset({Kind.EMBED}), 0, 0,
                profile(0.00207, 5.96 / 2.07),
            ),
            _model(
                "coder", _CODER_KINDS, frozenset({Kind.SIMPLE, Kind.CODE}), 1, 0,
                profile(0.00369, 8.02 / 3.69),
            ),
            _model(
                "reasoner", _CODER_KINDS, frozenset({Kind.REASON}), 0, 0,
                profile(0.00582, 8.60 / 5.82),
            ),
        ),
        {0: 1.0},
    )  # fmt: skip
