"""zeta's configuration file (TOML): models, routing policy and scoring, mailboxes, metrics, and
the HTTP server ``zeta serve`` runs.

:func:`load_config` reads a file, :func:`parse_config` a mapping already parsed. Both check every
key and value up front and raise :class:`~zeta.ConfigError` naming the key (``models[1].n_ctx``,
``scoring.tau``) and the problem, so a bad file fails before any model is loaded.
``examples/zeta.toml`` documents every key.

Values are validated where their type is defined: a ``[[models]]`` entry by
:class:`~zeta.ModelSpec`, ``[scoring]`` by :class:`~zeta.Scoring`, ``[policy.params]`` by the
policy's constructor. This module maps the file's keys onto them, handles what exists only in the
file (``ladder``, ``seed``, relative paths, the backend's name), and puts the key path in front
of their errors (:meth:`ConfigError.under <zeta.ConfigError.under>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError
from ._types import (
    SCORING_FIELDS,
    SERVED_KINDS,
    Kind,
    ModelSpec,
    Scoring,
    check_int,
    check_number,
    parse_kinds,
    shown,
    type_name,
)
from .backends import BACKENDS

__all__ = [
    "CalibrationSettings",
    "Config",
    "MetricsConfig",
    "ServeConfig",
    "load_config",
    "parse_config",
]

#: Scalar values a policy parameter may take.
ParamValue = bool | int | float | str

#: The most requests each actor's mailbox may hold (``scheduler.mailbox_capacity``); the
#: scheduler's bound too.
MAX_MAILBOX_CAPACITY = 1 << 20

#: The largest weight seed of a ladder model (``models[i].seed``): a 32-bit seed.
MAX_LADDER_SEED = 2**32 - 1

#: The largest config file read, in bytes; a longer one is refused before it is parsed.
MAX_CONFIG_BYTES = 1 << 20

#: The environment variable ``zeta serve`` reads its API key from unless told another.
DEFAULT_API_KEY_ENV = "ZETA_API_KEY"
#: Bounds of ``serve.max_body_bytes``: the largest request body the HTTP server reads.
MIN_BODY_BYTES, MAX_BODY_BYTES = 1 << 10, 1 << 30
#: The most tokens ``serve.max_tokens`` may default a request to (the scheduler's own bound).
_MAX_TOKENS = 1 << 20


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint: off unless enabled, bound to loopback unless told otherwise."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """The OpenAI-compatible HTTP server (``zeta serve``); validates itself.

    Args:
        host: address to bind; loopback unless told otherwise.
        port: TCP port (0 picks a free one).
        api_key: the bearer key every ``/v1`` and ``/metrics`` request must carry; prefer
            ``api_key_env``, which keeps the key out of the file. Not shown in ``repr``.
        api_key_env: the environment variable the key is read from when ``api_key`` is not
            given; when it is unset or empty, the server asks for no key.
        max_body_bytes: the largest request body read; a larger one is refused with HTTP 413.
        max_tokens: ``max_tokens`` of a request that gives none (``None``: the scheduler's
            default, 128).

    Raises:
        ConfigError: naming the field.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = DEFAULT_API_KEY_ENV
    max_body_bytes: int = 4 << 20
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"must be a non-empty string, got {type_name(self.host)}", key="host")
        check_int(self.port, "port", 0, 65535)
        if self.api_key is not None:
            _check_api_key(self.api_key, "api_key")
        if not isinstance(self.api_key_env, str) or not self.api_key_env.isidentifier():
            raise ConfigError(
                f"must name an environment variable, got {shown(self.api_key_env)}",
                key="api_key_env",
            )
        check_int(self.max_body_bytes, "max_body_bytes", MIN_BODY_BYTES, MAX_BODY_BYTES)
        if self.max_tokens is not None:
            check_int(self.max_tokens, "max_tokens", 1, _MAX_TOKENS)

    def resolve_api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The key the server asks for: ``api_key``, else the ``api_key_env`` variable's value
        (``None`` when it is unset or empty: no key asked for).

        Raises:
            ConfigError: the variable holds something that cannot be a bearer key.
        """
        if self.api_key is not None:
            return self.api_key
        value = environ.get(self.api_key_env, "")
        if not value:
            return None
        # Never show the value: it is a secret, and a wrong one may be another secret.
        return _check_api_key(value, self.api_key_env, show=False)


def _check_api_key(value: object, key: str, *, show: bool = True) -> str:
    """``value`` if a client can send it as ``Authorization: Bearer <value>``."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, got {type_name(value)}", key=key)
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise ConfigError(
            "must be printable ASCII without spaces (it travels in an HTTP header)"
            + ("" if show else "; the value is not shown"),
            key=key,
        )
    return value


#: Objectives a calibrator may minimise: a latency quantile or the mean, over served requests.
CALIBRATION_OBJECTIVES = ("p50", "p95", "p99", "mean")
#: The largest relative move of one parameter in one calibration run (the issue's bound).
MAX_CALIBRATION_STEP = 0.25


@dataclass(frozen=True, slots=True)
class CalibrationSettings:
    """The default feedback calibrator's settings (``[calibration]``); validates itself.

    Args:
        enabled: run the default calibrator (``False``: no calibration timer at all).
        interval_s: seconds between runs; each run looks at the arrivals of the last
            ``interval_s`` (its window). ``> 0``, at most 1e6.
        objective: what a run minimises over a window: ``"p95"`` (default), ``"p50"``,
            ``"p99"`` latency or ``"mean"`` latency, end to end.
        quality_budget: the largest share of requests served by a model that does not prefer
            their kind (spilled) that is free; above it the objective is multiplied by
            ``1 + 10 * (spilled - budget)``. 0 to 1.
        max_step: the most one parameter moves in one run, relative (0 to 0.25).
        margin: hysteresis: a candidate is applied only if its replayed objective beats the
            current parameters' by this share. 0 to 1 (exclusive).
        rollback_margin: a change is rolled back when the next window's live objective is worse
            than the replay predicted by more than this share. 0 to 10.
        candidates: candidate parameter sets replayed per run besides the current one
            (each one parameter moved up or down by ``max_step``), 1 to 24.
        tune: the :class:`~zeta.Scoring` fields a run may change (default: all of them).
        refit: refit each model's service model from its history (reported, and the replay's
            service model).
        feed: also feed the refitted service models into the kernel's estimates. Off by
            default: in ``python -m bench calibration`` feeding them made p95 3-35% worse (the
            fit overestimates step slope and co-load), while the EWMAs adapt on their own.
        max_samples: finished requests kept for the windows (the most recent), 64 to 1e6.
        max_replay_requests: the most arrivals one replay takes (the latest of the window),
            100 to 100000.
        min_requests: the fewest finished requests in a window for a run to tune or guard,
            1 to 100000.

    Raises:
        ConfigError: naming the field.
    """

    enabled: bool = True
    interval_s: float = 30.0
    objective: str = "p95"
    quality_budget: float = 0.5
    max_step: float = MAX_CALIBRATION_STEP
    margin: float = 0.05
    rollback_margin: float = 0.25
    candidates: int = 6
    tune: tuple[str, ...] = SCORING_FIELDS
    refit: bool = True
    feed: bool = False
    max_samples: int = 4096
    max_replay_requests: int = 2000
    min_requests: int = 50

    def __post_init__(self) -> None:
        for key in ("enabled", "refit", "feed"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"must be true or false, got {type_name(getattr(self, key))}", key=key
                )
        seconds = check_number(self.interval_s, "interval_s", 0.0, 1e6, low_open=True)
        object.__setattr__(self, "interval_s", seconds)
        if self.objective not in CALIBRATION_OBJECTIVES:
            raise ConfigError(
                f"must be one of {list(CALIBRATION_OBJECTIVES)}, got {shown(self.objective)}",
                key="objective",
            )
        for key, high in (("quality_budget", 1.0), ("rollback_margin", 10.0)):
            object.__setattr__(self, key, check_number(getattr(self, key), key, 0.0, high))
        step = check_number(self.max_step, "max_step", 0.0, MAX_CALIBRATION_STEP, low_open=True)
        object.__setattr__(self, "max_step", step)
        margin = check_number(self.margin, "margin", 0.0, 1.0)
        if margin >= 1.0:
            raise ConfigError("must be below 1", key="margin")
        object.__setattr__(self, "margin", margin)
        check_int(self.candidates, "candidates", 1, 24)
        check_int(self.max_samples, "max_samples", 64, 1_000_000)
        check_int(self.max_replay_requests, "max_replay_requests", 100, 100_000)
        check_int(self.min_requests, "min_requests", 1, 100_000)
        tune = self.tune
        if isinstance(tune, str | bytes) or not isinstance(tune, Collection):
            raise ConfigError(
                f"must be an array of parameter names, got {type_name(tune)}", key="tune"
            )
        for name in tune:
            if name not in SCORING_FIELDS:
                raise ConfigError(
                    f"unknown parameter {shown(name)}; tunable: {list(SCORING_FIELDS)}",
                    key="tune",
                )
        object.__setattr__(self, "tune", tuple(dict.fromkeys(tune)))


@dataclass(frozen=True, slots=True)
class Config:
    """A validated configuration.

    Args:
        models: the models to schedule onto, in file order.
        policy: routing policy name (``"dynamic"``, ``"static"``, ...).
        policy_params: keyword parameters for the policy's constructor.
        scoring: the scoring kernel's parameters.
        mailbox_capacity: bound of each actor's mailbox.
        kinds: kinds some model must serve; the file is rejected otherwise.
        metrics: the metrics endpoint.
        serve: the HTTP server of ``zeta serve``.
        calibration: the ``[calibration]`` table, or ``None`` when the file has none (the
            scheduler's defaults: the feedback calibrator, every 30 s).
        source: the file it came from, if any.
    """

    models: tuple[ModelSpec, ...]
    policy: str = "dynamic"
    policy_params: Mapping[str, ParamValue] = field(default_factory=dict)
    scoring: Scoring = field(default_factory=Scoring)
    mailbox_capacity: int = 64
    kinds: frozenset[Kind] = frozenset(SERVED_KINDS)
    metrics: MetricsConfig = MetricsConfig()
    serve: ServeConfig = field(default_factory=ServeConfig)
    calibration: CalibrationSettings | None = None
    source: Path | None = None

    @property
    def optional(self) -> frozenset[str]:
        """Names of the models the scheduler may start without (``optional = true``)."""
        return frozenset(m.name for m in self.models if m.optional)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Scheduler(**config.scheduler_kwargs())``.

        ``models`` (``optional`` ones included: the flag is on each :class:`~zeta.ModelSpec`),
        ``mailbox_capacity``, ``policy`` (its name, or an object built with its parameters) and
        ``scoring``, and ``calibration`` when the file has a ``[calibration]`` table. The
        metrics endpoint is left to the caller;
        :meth:`Scheduler.from_config <zeta.Scheduler.from_config>` serves it when enabled.
        """
        policy: object = self.policy
        if self.policy_params:
            policy = _make_policy(self.policy, self.policy_params)
        kwargs: dict[str, Any] = {
            "models": list(self.models),
            "mailbox_capacity": self.mailbox_capacity,
            "policy": policy,
            "scoring": self.scoring,
        }
        if self.calibration is not None:
            kwargs["calibration"] = self.calibration
        return kwargs


def load_config(path: str | os.PathLike[str], *, make_models: bool = True) -> Config:
    """Read and validate a TOML config file (what ``zeta config check FILE`` runs).

    Relative model paths are resolved against the file's directory. A model given as
    ``ladder = "coder"`` resolves to zeta's generated model of that name, which is written to
    the cache first if ``make_models`` is true and it is not there yet.

    Raises:
        ConfigError: the file is missing, unreadable or larger than :data:`MAX_CONFIG_BYTES`, is
            not valid TOML (nested too deeply, an integer too long to read), or has an invalid
            key or value (the message names it).
    """
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # an integer literal too long to convert
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, base_dir=p.parent, source=p, make_models=make_models)


# --------------------------------------------------------------------------------------------
# Checks of the file's own keys. Each takes the dotted key it is checking, for the error message.


def _check_keys(table: Mapping[str, Any], allowed: Collection[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(allowed)}"
            raise ConfigError(f"unknown key{hint}", key=f"{prefix}{key}")


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table, got {type_name(value)}", key=key)
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {type_name(value)}", key=key)
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, got {type_name(value)}", key=key)
    return value


def _param(value: object, key: str) -> ParamValue:
    if isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"must be a number, string or boolean, got {type_name(value)}", key=key)


# --------------------------------------------------------------------------------------------
# Sections.

_TOP_KEYS = ("scheduler", "policy", "scoring", "metrics", "serve", "calibration", "models")
_SCHEDULER_KEYS = ("mailbox_capacity", "kinds")
_POLICY_KEYS = ("name", "params")
_METRICS_KEYS = ("enabled", "host", "port")
_SERVE_KEYS = tuple(f.name for f in dataclasses.fields(ServeConfig))
_CALIBRATION_KEYS = tuple(f.name for f in dataclasses.fields(CalibrationSettings))
#: Keys of a ``[[models]]`` entry: :class:`~zeta.ModelSpec`'s fields, and the two that choose a
#: ladder model instead of a path.
_MODEL_KEYS = (*(f.name for f in dataclasses.fields(ModelSpec)), "ladder", "seed")


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] = ".",
    source: Path | None = None,
    make_models: bool = True,
) -> Config:
    """Validate an already-parsed config mapping (the TOML document's top-level table).

    Raises:
        ConfigError: naming the first invalid key and what is wrong with it.
    """
    _check_keys(data, _TOP_KEYS, "")

    sched = _table(data.get("scheduler", {}), "scheduler")
    _check_keys(sched, _SCHEDULER_KEYS, "scheduler.")
    capacity = check_int(
        sched.get("mailbox_capacity", 64), "scheduler.mailbox_capacity", 1, MAX_MAILBOX_CAPACITY
    )
    required = (
        parse_kinds(sched["kinds"], "scheduler.kinds")
        if "kinds" in sched
        else frozenset(SERVED_KINDS)
    )

    pol = _table(data.get("policy", {}), "policy")
    _check_keys(pol, _POLICY_KEYS, "policy.")
    policy = _str(pol.get("name", "dynamic"), "policy.name")
    params = {
        k: _param(v, f"policy.params.{k}")
        for k, v in _table(pol.get("params", {}), "policy.params").items()
    }
    _make_policy(policy, params)

    raw_scoring = _table(data.get("scoring", {}), "scoring")
    _check_keys(raw_scoring, SCORING_FIELDS, "scoring.")
    try:
        scoring = Scoring(**raw_scoring)
    except ConfigError as exc:
        raise exc.under("scoring") from None

    met = _table(data.get("metrics", {}), "metrics")
    _check_keys(met, _METRICS_KEYS, "metrics.")
    metrics = MetricsConfig(
        enabled=_bool(met.get("enabled", False), "metrics.enabled"),
        host=_str(met.get("host", "127.0.0.1"), "metrics.host"),
        port=check_int(met.get("port", 9464), "metrics.port", 0, 65535),
    )

    raw_serve = _table(data.get("serve", {}), "serve")
    _check_keys(raw_serve, _SERVE_KEYS, "serve.")
    if "api_key" in raw_serve and "api_key_env" in raw_serve:
        raise ConfigError("give either api_key or api_key_env, not both", key="serve.api_key")
    try:
        serve = ServeConfig(**raw_serve)
    except ConfigError as exc:
        raise exc.under("serve") from None

    calibration = None
    if "calibration" in data:
        raw_cal = _table(data["calibration"], "calibration")
        _check_keys(raw_cal, _CALIBRATION_KEYS, "calibration.")
        try:
            calibration = CalibrationSettings(**raw_cal)
        except ConfigError as exc:
            raise exc.under("calibration") from None

    raw_models = data.get("models")
    if raw_models is None:
        raise ConfigError("no models configured; add at least one [[models]] table", key="models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(
            f"must be a non-empty array of tables ([[models]]), got {type_name(raw_models)}",
            key="models",
        )
    models: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_models):
        spec = _model(raw, i, Path(base_dir), make_models)
        if spec.name in seen:
            raise ConfigError(
                f"duplicate model name {spec.name!r} (also models[{seen[spec.name]}])",
                key=f"models[{i}].name",
            )
        seen[spec.name] = i
        models.append(spec)

    for kind in sorted(required, key=SERVED_KINDS.index):
        if not any(kind in m.kinds for m in models):
            raise ConfigError(
                f"no model serves kind {kind.value!r}; add one, or list only the kinds you need "
                "in scheduler.kinds",
                key="models",
            )
        if all(m.optional for m in models if kind in m.kinds):
            raise ConfigError(
                f"every model that serves kind {kind.value!r} is optional; make one required",
                key="models",
            )

    return Config(
        models=tuple(models),
        policy=policy,
        policy_params=params,
        scoring=scoring,
        mailbox_capacity=capacity,
        kinds=required,
        metrics=metrics,
        serve=serve,
        calibration=calibration,
        source=source,
    )


def _make_policy(name: str, params: Mapping[str, ParamValue]) -> object:
    """The policy ``name`` built with ``params``, which its constructor validates.

    Raises:
        ConfigError: an unknown policy, a parameter its constructor does not take, or a value it
            rejects (keyed under ``policy.params``).
    """
    from ._policies import POLICIES

    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; known: {sorted(POLICIES)}", key="policy.name")
    accepted = [p for p in inspect.signature(cls).parameters if p != "seed"]
    for key in params:
        if key not in accepted:
            takes = f"it takes {sorted(accepted)}" if accepted else "it takes none"
            hint = "; scoring parameters go in the [scoring] table" if key in SCORING_FIELDS else ""
            raise ConfigError(
                f"policy {name!r} takes no parameter {key!r}; {takes}{hint}",
                key=f"policy.params.{key}",
            )
    try:
        policy: object = cls(**params)
    except ConfigError as exc:
        raise exc.under("policy.params") from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(str(exc), key="policy.params") from None
    return policy


def _model(raw: object, i: int, base_dir: Path, make_models: bool) -> ModelSpec:
    """The :class:`~zeta.ModelSpec` of ``models[i]``; the spec validates every field it has."""
    prefix = f"models[{i}]"
    table = _table(raw, prefix)
    _check_keys(table, _MODEL_KEYS, f"{prefix}.")
    if "name" not in table:
        raise ConfigError("missing; every model needs a name", key=f"{prefix}.name")
    fields = {k: v for k, v in table.items() if k not in ("ladder", "seed")}
    ladder = None
    seed = 0
    if "ladder" in table:
        from . import _ladder  # pulls in gguf: only when a ladder model is named

        if "path" in table:
            raise ConfigError("give either path or ladder, not both", key=f"{prefix}.path")
        name = _str(table["ladder"], f"{prefix}.ladder")
        ladder = _ladder.LADDER.get(name)
        if ladder is None:
            raise ConfigError(
                f"unknown ladder model {shown(name)}; known: {sorted(_ladder.LADDER)}",
                key=f"{prefix}.ladder",
            )
        seed = check_int(table.get("seed", 0), f"{prefix}.seed", 0, MAX_LADDER_SEED)
        kinds, preferred, quality = _ladder.ROLES[ladder.role]
        if "kinds" in table and "preferred" not in table:
            # The role's preferred kinds, narrowed to what this entry serves (empty: all of
            # them). Invalid kinds are left for ModelSpec to report.
            with contextlib.suppress(ConfigError):
                preferred = preferred & parse_kinds(table["kinds"], "kinds")
        path = str(_ladder.model_path(ladder, seed=seed))
        role = {"path": path, "kinds": kinds, "preferred": preferred, "quality": quality}
        fields = {**role, **fields}
    elif "seed" in table:
        raise ConfigError("seed applies to ladder models only", key=f"{prefix}.seed")

    try:
        spec = ModelSpec(**fields)
    except ConfigError as exc:
        raise exc.under(prefix) from None
    if spec.backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {spec.backend!r}; known: {sorted(BACKENDS)}",
            key=f"{prefix}.backend",
        )
    if spec.path is None and spec.backend != "simulated":
        raise ConfigError(
            "missing; give path (a GGUF file) or ladder (a generated model name)",
            key=f"{prefix}.path",
        )
    if ladder is not None:
        if make_models:
            _ladder.make_model(ladder, seed=seed)
    elif spec.path is not None:
        spec = dataclasses.replace(spec, path=_resolve(spec.path, base_dir, f"{prefix}.path"))
    return spec


def _resolve(path: str, base_dir: Path, key: str) -> str:
    """``path`` made absolute, relative to the config file's directory; ``~`` expanded."""
    try:
        return str((base_dir / Path(path).expanduser()).resolve())
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot resolve {shown(path)}: {exc}", key=key) from None
