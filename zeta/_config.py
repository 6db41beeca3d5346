"""zeta's configuration file (TOML): models, routing policy, mailboxes and the metrics endpoint.

:func:`load_config` reads a file, :func:`parse_config` a mapping already parsed. Both check every
key and value up front and raise :class:`~zeta.ConfigError` naming the key (``models[1].n_ctx``,
``policy.name``) and the problem, so a bad file fails before any model is loaded.
``examples/zeta.toml`` documents every key.
"""

from __future__ import annotations

import difflib
import inspect
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError
from ._types import SERVED_KINDS, Kind, ModelSpec
from .backends import BACKENDS

__all__ = ["KERNEL_PARAMS", "Config", "MetricsConfig", "load_config", "parse_config"]

#: Scalar values a policy parameter may take.
ParamValue = bool | int | float | str

#: Policy parameters that belong to the scoring kernel, passed to the :class:`~zeta.Scheduler`
#: itself rather than to the policy's constructor.
KERNEL_PARAMS = frozenset({"tau", "contention_weight", "spill_penalty", "quality_penalty"})


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint: off unless enabled, bound to loopback unless told otherwise."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class Config:
    """A validated configuration.

    Args:
        models: the models to schedule onto, in file order.
        policy: routing policy name (``"dynamic"``, ``"static"``, ...).
        policy_params: keyword parameters for the policy.
        mailbox_capacity: bound of each actor's mailbox.
        kinds: kinds some model must serve; the file is rejected otherwise.
        metrics: the metrics endpoint.
        source: the file it came from, if any.
    """

    models: tuple[ModelSpec, ...]
    policy: str = "dynamic"
    policy_params: Mapping[str, ParamValue] = field(default_factory=dict)
    mailbox_capacity: int = 64
    kinds: frozenset[Kind] = frozenset(SERVED_KINDS)
    metrics: MetricsConfig = MetricsConfig()
    source: Path | None = None

    @property
    def optional(self) -> frozenset[str]:
        """Names of the models the scheduler may start without (``optional = true``)."""
        return frozenset(m.name for m in self.models if m.optional)

    def model(self, name: str) -> ModelSpec:
        """The model called ``name``."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Scheduler(**config.scheduler_kwargs())``.

        Models (``optional`` ones included: the flag is on each
        :class:`~zeta.ModelSpec`), mailbox capacity, the policy (a name, or an object built with
        its parameters) and the kernel parameters. The metrics endpoint is left to the caller;
        :meth:`Scheduler.from_config <zeta.Scheduler.from_config>` serves it when enabled.
        """
        kwargs: dict[str, Any] = {
            "models": list(self.models),
            "mailbox_capacity": self.mailbox_capacity,
            "policy": self.policy,
        }
        kwargs.update({k: float(v) for k, v in self.policy_params.items() if k in KERNEL_PARAMS})
        policy_kwargs = _policy_kwargs(self.policy, self.policy_params)
        if policy_kwargs:
            from ._policies import POLICIES

            kwargs["policy"] = POLICIES[self.policy](**policy_kwargs)
        return kwargs


def load_config(path: str | os.PathLike[str], *, make_models: bool = True) -> Config:
    """Read and validate a TOML config file.

    Relative model paths are resolved against the file's directory. A model given as
    ``ladder = "coder"`` resolves to zeta's generated model of that name, which is written to
    the cache first if ``make_models`` is true and it is not there yet.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML, or has an invalid key
            or value (the message names it).
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, base_dir=p.parent, source=p, make_models=make_models)


# --------------------------------------------------------------------------------------------
# Validation helpers. Each takes the dotted key it is checking, for the error message.


def _type_name(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a float", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)  # fmt: skip


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, object], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(allowed)}"
            raise ConfigError(f"unknown key{hint}", key=f"{prefix}{key}")


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table, got {_type_name(value)}", key=key)
    return value


def _int(value: object, key: str, *, low: int | None = None, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"must be an integer, got {_type_name(value)}", key=key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"must be {bounds}, got {value}", key=key)
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {_type_name(value)}", key=key)
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, got {_type_name(value)}", key=key)
    return value


def _kinds(value: object, key: str) -> frozenset[Kind]:
    if not isinstance(value, list):
        raise ConfigError(f"must be an array of kinds, got {_type_name(value)}", key=key)
    out = set()
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"kinds are strings, got {_type_name(item)}", key=key)
        try:
            kind = Kind(item)
        except ValueError:
            names = [k.value for k in SERVED_KINDS]
            raise ConfigError(f"unknown kind {item!r}; expected one of {names}", key=key) from None
        if kind is Kind.AUTO:
            raise ConfigError("'auto' is a request kind, not one a model serves", key=key)
        out.add(kind)
    return frozenset(out)


def _param(value: object, key: str) -> ParamValue:
    if isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"must be a number, string or boolean, got {_type_name(value)}", key=key)


# --------------------------------------------------------------------------------------------
# Sections.

_TOP_KEYS = {"scheduler": None, "policy": None, "metrics": None, "models": None}
_SCHEDULER_KEYS = {"mailbox_capacity": None, "kinds": None}
_POLICY_KEYS = {"name": None, "params": None}
_METRICS_KEYS = {"enabled": None, "host": None, "port": None}

_ModelField = Callable[[object, str], object]
_MODEL_KEYS: dict[str, _ModelField] = {
    "name": _str,
    "path": _str,
    "ladder": _str,
    "seed": lambda v, k: _int(v, k, low=0),
    "backend": _str,
    "kinds": _kinds,
    "preferred": _kinds,
    "quality": lambda v, k: _int(v, k, low=0),
    "replicas": lambda v, k: _int(v, k, low=1),
    "n_ctx": lambda v, k: _int(v, k, low=16),
    "n_threads": lambda v, k: _int(v, k, low=1),
    "n_gpu_layers": lambda v, k: _int(v, k, low=-1),
    "device": lambda v, k: _int(v, k, low=0),
    "optional": _bool,
    "options": _table,
}


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
    capacity = _int(sched.get("mailbox_capacity", 64), "scheduler.mailbox_capacity", low=1)
    required = (
        _kinds(sched["kinds"], "scheduler.kinds") if "kinds" in sched else frozenset(SERVED_KINDS)
    )

    pol = _table(data.get("policy", {}), "policy")
    _check_keys(pol, _POLICY_KEYS, "policy.")
    policy = _str(pol.get("name", "dynamic"), "policy.name")
    params = {
        k: _param(v, f"policy.params.{k}")
        for k, v in _table(pol.get("params", {}), "policy.params").items()
    }
    _policy_kwargs(policy, params)

    met = _table(data.get("metrics", {}), "metrics")
    _check_keys(met, _METRICS_KEYS, "metrics.")
    metrics = MetricsConfig(
        enabled=_bool(met.get("enabled", False), "metrics.enabled"),
        host=_str(met.get("host", "127.0.0.1"), "metrics.host"),
        port=_int(met.get("port", 9464), "metrics.port", low=0, high=65535),
    )

    raw_models = data.get("models")
    if raw_models is None:
        raise ConfigError("no models configured; add at least one [[models]] table", key="models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(
            f"must be a non-empty array of tables ([[models]]), got {_type_name(raw_models)}",
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
        mailbox_capacity=capacity,
        kinds=required,
        metrics=metrics,
        source=source,
    )


def _policy_kwargs(name: str, params: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
    """Check ``params`` and return the ones for the policy's constructor.

    The kernel's parameters (:data:`KERNEL_PARAMS`) go to the scheduler and must be numbers
    >= 0; every other parameter must be one the policy's constructor takes, with a value it
    accepts (it is built once, here, to find out).
    """
    from ._policies import POLICIES

    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}; known: {sorted(POLICIES)}", key="policy.name")
    for key in KERNEL_PARAMS.intersection(params):
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"must be a number >= 0, got {value!r}", key=f"policy.params.{key}")
    kwargs = {k: v for k, v in params.items() if k not in KERNEL_PARAMS}
    accepted = [p for p in inspect.signature(cls).parameters if p != "seed"]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"policy {name!r} takes no parameter {key!r}; it takes "
                f"{sorted([*accepted, *KERNEL_PARAMS])}",
                key=f"policy.params.{key}",
            )
    try:
        cls(**kwargs)
    except ConfigError as exc:
        detail = f"{exc.key}: " if exc.key else ""
        raise ConfigError(f"{detail}{str(exc).removeprefix(detail)}", key="policy.params") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), key="policy.params") from None
    return kwargs


def _model(raw: object, i: int, base_dir: Path, make_models: bool) -> ModelSpec:
    prefix = f"models[{i}]"
    table = _table(raw, prefix)
    _check_keys(table, _MODEL_KEYS, f"{prefix}.")
    values: dict[str, Any] = {k: _MODEL_KEYS[k](v, f"{prefix}.{k}") for k, v in table.items()}
    if "name" not in values:
        raise ConfigError("missing; every model needs a name", key=f"{prefix}.name")
    name = str(values.pop("name"))
    backend = str(values.pop("backend", "llama_cpp"))
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {backend!r}; known: {sorted(BACKENDS)}", key=f"{prefix}.backend"
        )
    path, ladder = values.pop("path", None), values.pop("ladder", None)
    seed = values.pop("seed", None)
    fields: dict[str, Any] = {"name": name, "backend": backend}

    if path is not None and ladder is not None:
        raise ConfigError("give either path or ladder, not both", key=f"{prefix}.path")
    if seed is not None and ladder is None:
        raise ConfigError("seed applies to ladder models only", key=f"{prefix}.seed")
    if ladder is not None:
        from .testing import _ladder  # pulls in gguf: only when a ladder model is named

        if ladder not in _ladder.LADDER:
            raise ConfigError(
                f"unknown ladder model {ladder!r}; known: {sorted(_ladder.LADDER)}",
                key=f"{prefix}.ladder",
            )
        m = _ladder.LADDER[str(ladder)]
        s = int(seed or 0)
        file = _ladder.make_model(m, seed=s) if make_models else _ladder.model_path(m, seed=s)
        kinds, preferred, quality = _ladder.ROLES[m.role]
        fields.update(path=str(file), kinds=kinds, preferred=preferred, quality=quality)
    elif path is not None:
        fields["path"] = str((base_dir / Path(str(path)).expanduser()).resolve())
    elif backend != "simulated":
        raise ConfigError(
            "missing; give path (a GGUF file) or ladder (a generated model name)",
            key=f"{prefix}.path",
        )
    if "kinds" in values and "preferred" not in values and "preferred" in fields:
        # A ladder role's preferred kinds, narrowed to what this entry serves (empty: all).
        fields["preferred"] = fields["preferred"] & values["kinds"]
    fields.update(values)
    if "options" in fields:
        fields["options"] = dict(fields["options"])
    try:
        return ModelSpec(**fields)
    except ConfigError as exc:
        # ModelSpec names keys as models.<name>.<field>; point at the file's entry instead.
        field_name = (exc.key or "").rpartition(".")[2] or "name"
        message = str(exc)[len(exc.key) + 2 :] if exc.key else str(exc)
        raise ConfigError(message, key=f"{prefix}.{field_name}") from None
