"""Core value types: request kinds, priorities and model specs."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
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


def _kinds(value: Iterable[Kind | str], key: str) -> frozenset[Kind]:
    if isinstance(value, str):
        raise ConfigError("expected a list of kinds, got a string", key=key)
    out = set()
    for v in value:
        try:
            k = Kind(v)
        except ValueError:
            raise ConfigError(
                f"unknown kind {v!r}; expected one of {[k.value for k in SERVED_KINDS]}", key=key
            ) from None
        if k is Kind.AUTO:
            raise ConfigError("'auto' is not a kind a model serves", key=key)
        out.add(k)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model zeta schedules onto.

    Args:
        name: unique name, used in logs, metrics and snapshots.
        path: GGUF file (or ladder name resolved by the config loader); ``None`` for simulated
            backends.
        kinds: kinds this model can serve at all.
        preferred: kinds it is meant for; serving any other capable kind costs ``spill_penalty``.
        quality: quality rank, 0 is best; each rank adds ``quality_penalty`` seconds of cost.
        replicas: how many independent contexts (actors) to run.
        n_ctx, n_threads, n_gpu_layers: llama.cpp context parameters.
        device: GPU index the model's layers live on, ``None`` for the CPU.
        backend: backend name (``"llama_cpp"`` or ``"simulated"``).
        options: backend-specific options.
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
    n_ctx: int = 2048
    n_threads: int = 1
    n_gpu_layers: int = 0
    device: int | None = None
    backend: str = "llama_cpp"
    options: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    optional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not self.name.isprintable():
            raise ConfigError("must be a non-empty printable string", key="name")
        key = f"models.{self.name}"
        object.__setattr__(self, "kinds", _kinds(self.kinds, f"{key}.kinds"))
        preferred = self.preferred if self.preferred else self.kinds
        object.__setattr__(self, "preferred", _kinds(preferred, f"{key}.preferred"))
        if not self.kinds:
            raise ConfigError("a model must serve at least one kind", key=f"{key}.kinds")
        if not self.preferred <= self.kinds:
            extra = sorted(k.value for k in self.preferred - self.kinds)
            raise ConfigError(f"preferred kinds {extra} are not served", key=f"{key}.preferred")
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        for attr, low in (("quality", 0), ("replicas", 1), ("n_ctx", 16), ("n_threads", 1)):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"must be an integer >= {low}, got {v!r}", key=f"{key}.{attr}")
        if not isinstance(self.n_gpu_layers, int) or self.n_gpu_layers < -1:
            raise ConfigError("must be an integer >= -1", key=f"{key}.n_gpu_layers")
        if self.device is not None and (not isinstance(self.device, int) or self.device < 0):
            raise ConfigError("must be a GPU index >= 0 or absent", key=f"{key}.device")
        if not isinstance(self.optional, bool):
            raise ConfigError(
                f"must be true or false, got {self.optional!r}", key=f"{key}.optional"
            )

    @property
    def file(self) -> Path | None:
        """The model file as a path, if any."""
        return Path(self.path) if self.path else None
