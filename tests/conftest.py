"""Shared fixtures."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import settings

from zeta import Outcome, Recorder
from zeta._snapshot import ActorState, ModelSnapshot, SchedulerSnapshot
from zeta.telemetry import DeviceReading, DeviceSampler
from zeta.telemetry._logging import reset_logging

# --- a private cache: generated models, probe verdicts and trust markers live there, not in ~ ---
_CACHE_ENV = "ZETA_CACHE_DIR"
_own_cache: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _own_cache
    if _CACHE_ENV not in os.environ:  # a CI run may point it at a cache it keeps
        _own_cache = tempfile.mkdtemp(prefix="zeta-test-cache-")
        os.environ[_CACHE_ENV] = _own_cache


def pytest_unconfigure(config: pytest.Config) -> None:
    if _own_cache is not None:
        shutil.rmtree(_own_cache, ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)


# --- telemetry fixtures: fresh metrics registry, captured logs, fake NVML, populated scheduler ---


@pytest.fixture
def metrics_registry() -> Any:
    """A fresh Prometheus registry: tests never touch prometheus_client's global one."""
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


class _CaptureHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # zeta loggers hand the processed (already redacted) event dict over as record.msg.
        msg = record.msg
        event = dict(msg) if isinstance(msg, dict) else {"event": record.getMessage()}
        event.setdefault("logger", record.name)
        event.setdefault("log_level", record.levelname.lower())
        self.events.append(event)


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every event zeta logs during the test (debug and up), after redaction, as dicts."""
    logger = logging.getLogger("zeta")
    handler = _CaptureHandler()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(autouse=True)
def _reset_zeta_logging() -> Iterator[None]:
    """Undo any configure_logging() a test made, so tests stay independent."""
    yield
    reset_logging()


class FakeNvmlError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


class FakeNvmlLibraryNotFound(FakeNvmlError):
    """Stands in for ``pynvml.NVMLError_LibraryNotFound``."""


class FakeNvml:
    """A scripted stand-in for the ``pynvml`` module, injected into ``NvmlDevices(nvml=...)``.

    ``devices`` gives, per NVML index, a utilisation script (percent; one value per read, the last
    one repeating), memory used and total, and optionally a UUID. ``init_error`` makes
    ``nvmlInit`` raise; ``fail_reads`` lists NVML indices whose reads raise.
    """

    NVMLError = FakeNvmlError
    NVMLError_LibraryNotFound = FakeNvmlLibraryNotFound

    def __init__(
        self,
        devices: Sequence[dict[str, Any]] = (),
        *,
        init_error: BaseException | None = None,
        fail_reads: Sequence[int] = (),
    ) -> None:
        self.devices = [dict(d) for d in devices]
        self.init_error = init_error
        self.fail_reads = set(fail_reads)
        self.init_calls = 0
        self.shutdown_calls = 0
        self.reads: list[int] = []

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self.devices):
            raise FakeNvmlError(f"invalid index {index}")
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> tuple[str, int]:
        for i, d in enumerate(self.devices):
            if d.get("uuid") == uuid:
                return ("handle", i)
        raise FakeNvmlError(f"no device {uuid}")

    def nvmlDeviceGetUtilizationRates(self, handle: tuple[str, int]) -> SimpleNamespace:
        index = handle[1]
        if index in self.fail_reads:
            raise FakeNvmlError("GPU is lost")
        self.reads.append(index)
        script = self.devices[index]["util"]
        value = script.pop(0) if len(script) > 1 else script[0]
        return SimpleNamespace(gpu=value, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> SimpleNamespace:
        d = self.devices[handle[1]]
        return SimpleNamespace(used=d["used"], total=d["total"], free=d["total"] - d["used"])


@pytest.fixture
def fake_nvml() -> type[FakeNvml]:
    """The :class:`FakeNvml` class: build one with scripted devices per test."""
    return FakeNvml


def actor(
    name: str,
    replica: int = 0,
    *,
    device: int | None = None,
    state: ActorState = ActorState.READY,
    busy_s: float = 0.0,
    utilisation: float = 0.0,
    **kw: Any,
) -> ModelSnapshot:
    """A ModelSnapshot with defaults for everything the test does not care about."""
    fields: dict[str, Any] = {
        "queue_len": 0, "in_flight": 0, "ewma_request_s": 0.0, "ewma_token_s": 0.0,
        "restarts": 0, "completed": 0, "failed": 0,
    }  # fmt: skip
    fields.update(kw)
    return ModelSnapshot(
        name=name, replica=replica, device=device, state=state, busy_s=busy_s,
        utilisation=utilisation, **fields,
    )  # fmt: skip


@pytest.fixture
def make_actor() -> Callable[..., ModelSnapshot]:
    """Builds ModelSnapshots: ``make_actor("coder", 0, device=0, queue_len=3)``."""
    return actor


class FakeScheduler:
    """Has what the metrics collector reads from a Scheduler: ``recorder``, ``snapshot()``,
    ``sampler``. Its state is whatever the test puts in."""

    def __init__(
        self, models: Sequence[ModelSnapshot], sampler: DeviceSampler | None = None
    ) -> None:
        self.recorder = Recorder()
        self.models = tuple(models)
        self.sampler = sampler
        self.snapshot_error: Exception | None = None

    def snapshot(self) -> SchedulerSnapshot:
        if self.snapshot_error is not None:
            raise self.snapshot_error
        return SchedulerSnapshot(at=123.0, models=self.models)


class _StaticGpus:
    def __init__(self, readings: dict[int, DeviceReading]) -> None:
        self.readings = readings

    def read(self) -> dict[int, DeviceReading]:
        return self.readings


@pytest.fixture
def populated_scheduler() -> FakeScheduler:
    """A fake scheduler with every metric family populated (GPU and CPU models, spills, ...).

    Deterministic: the same numbers on every call, so tests can compare exact values.
    """
    return build_populated_scheduler()


@pytest.fixture(scope="module")
def populated_scheduler_shared() -> FakeScheduler:
    """:func:`populated_scheduler` shared by a module's tests (for ones that start processes)."""
    return build_populated_scheduler()


def build_populated_scheduler() -> FakeScheduler:
    gpus = _StaticGpus(
        {
            0: DeviceReading(0, 0.75, 30 * 2**30, 80 * 2**30),
            1: DeviceReading(1, 0.25, 8 * 2**30, 80 * 2**30),
        }
    )
    models = [
        actor("coder", 0, device=0, queue_len=3, in_flight=1, ewma_request_s=0.4,
              ewma_token_s=0.006, busy_s=12.5, restarts=1, completed=7),
        actor("coder", 1, device=0, queue_len=1, in_flight=1, ewma_request_s=0.5,
              ewma_token_s=0.007, busy_s=11.0, completed=3),
        actor("embedder", 0, device=1, ewma_request_s=0.02, busy_s=1.5, completed=4),
        actor("reasoner", 0, device=None, state=ActorState.RESTARTING, queue_len=2,
              ewma_request_s=2.0, ewma_token_s=0.03, busy_s=40.0, failed=1),
    ]  # fmt: skip
    sampler = DeviceSampler(gpus=gpus)
    zs = FakeScheduler(models, sampler=sampler)
    sampler.sample(zs.models, 1.0)  # the supervisor's timer would do this
    rec = zs.recorder
    for i, service_s in enumerate((0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.8)):
        rec.request_finished(
            "coder", "code", Outcome.OK, queue_wait_s=0.01 * i, service_s=service_s,
            total_s=service_s + 0.05,
        )  # fmt: skip
    for _ in range(3):
        rec.request_finished(
            "coder", "simple", Outcome.OK, queue_wait_s=0.002, service_s=0.05, total_s=0.06
        )
    rec.request_finished("embedder", "embed", Outcome.OK, queue_wait_s=0.0, service_s=0.02,
                         total_s=0.021)  # fmt: skip
    rec.request_finished("reasoner", "reason", Outcome.DEADLINE, queue_wait_s=3.0, total_s=3.0)
    rec.request_finished("reasoner", "reason", Outcome.ACTOR_DEAD, queue_wait_s=0.1,
                         service_s=1.5, total_s=1.6)  # fmt: skip
    rec.request_finished(None, "code", Outcome.OVERLOADED)
    rec.request_finished(None, "no such kind", Outcome.INVALID)
    rec.spilled("coder", "reasoner")
    rec.spilled("coder", "reasoner")
    rec.spilled("reasoner", "coder")
    rec.restarted("reasoner")
    rec.rejected("code")
    rec.calibrated({"contention_weight": 1.5, "spill_penalty_s": 0.25})
    return zs


# --- model fixtures: tiny generated GGUF models for the llama.cpp backend ---


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three ``*-tiny`` ladder models, generated once per session into a temporary
    directory (a few MB, milliseconds to write): ``{"coder-tiny": Path, ...}``."""
    from zeta.testing import make_ladder

    directory = tmp_path_factory.mktemp("models")
    return make_ladder(["embedder-tiny", "coder-tiny", "reasoner-tiny"], directory=directory)


# --- scoring kernel: Hypothesis profile, both kernel implementations ---

# The suite shares a small, busy machine: a per-example deadline would only add flakiness.
# ZETA_HYPOTHESIS_PROFILE=thorough runs ten times more examples.
settings.register_profile("default", deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("ZETA_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(
    scope="session",
    params=[
        pytest.param("zeta._scoring_py", id="py"),
        pytest.param("zeta._scoring_c", id="c"),
    ],
)
def kernel(request: pytest.FixtureRequest) -> ModuleType:
    """Each scoring-kernel implementation in turn: the pure-Python reference, then the compiled one.

    Imported directly, whatever ``ZETA_NO_EXTENSIONS`` says, so both are always tested.
    """
    return importlib.import_module(request.param)


# --- scheduler fixtures: both anyio backends ---
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every ``@pytest.mark.anyio`` test runs on asyncio and on trio."""
    return str(request.param)
