"""Utilisation samplers, run by the supervisor on a timer (never per message).

A sampler maps the actors' snapshots to one utilisation reading (0..1) per actor, in order;
the scheduler writes the readings into the scoring kernel's ``util`` column.

:class:`DeviceSampler` is the default: models on a GPU get their device's NVML utilisation (a
device-level signal, since models sharing a GPU slow each other down), models on the CPU get the
host's CPU utilisation, the same device-level signal for the device they share.
:class:`BusyFractionSampler` (each actor's time inside inference over wall time) is the other
choice for CPU models; it is not the default because it double-counts load: an actor with a
queue is busy, so its own queue would both lengthen its expected wait and inflate its contention
factor, and the kernel would spill far more than it should (measured in the demo: 22% of requests
spilled and code p95 doubled against the static rules). :class:`ProcessSampler` reads zeta's own
CPU time and memory for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._snapshot import ModelSnapshot
from ._logging import get_logger
from ._nvml import DeviceReading, NvmlDevices

__all__ = [
    "BusyFractionSampler",
    "DeviceSampler",
    "GpuReader",
    "HostCpuSampler",
    "ProcessReading",
    "ProcessSampler",
    "UtilisationSampler",
]

log = get_logger(__name__)


class UtilisationSampler(Protocol):
    """Returns one utilisation in [0, 1] per actor snapshot, in the same order."""

    def sample(self, actors: Sequence[ModelSnapshot], now: float) -> Sequence[float]: ...


class GpuReader(Protocol):
    """Per-device GPU readings (:class:`~zeta.telemetry.NvmlDevices` is the real one)."""

    def read(self) -> Mapping[int, DeviceReading]: ...


class BusyFractionSampler:
    """Utilisation of CPU-placed models: time inside inference over wall time since last sample."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], tuple[float, float]] = {}

    def sample(self, actors: Sequence[ModelSnapshot], now: float) -> Sequence[float]:
        out = []
        for a in actors:
            key = (a.name, a.replica)
            prev = self._last.get(key)
            self._last[key] = (now, a.busy_s)
            if prev is None or now <= prev[0]:
                out.append(a.utilisation)
                continue
            frac = (a.busy_s - prev[1]) / (now - prev[0])
            out.append(min(1.0, max(0.0, frac)))
        return out


class HostCpuSampler:
    """Utilisation of the host CPU over the last interval, the same reading for every actor.

    CPU-placed models share one device, the host's cores, so like a GPU's reading this is a
    device-level signal: other models and other processes busy on the host slow every CPU model.

    Args:
        cpu_times: returns ``(busy_seconds, total_seconds)`` summed over all cores since boot;
            ``None`` means psutil's system-wide ``cpu_times()``. Tests inject a script.
    """

    def __init__(self, cpu_times: Callable[[], tuple[float, float]] | None = None) -> None:
        self._cpu_times = _psutil_cpu_times if cpu_times is None else cpu_times
        self._last: tuple[float, float] | None = None
        self._value = 0.0

    def sample(self, actors: Sequence[ModelSnapshot], now: float) -> Sequence[float]:
        busy, total = self._cpu_times()
        last, self._last = self._last, (busy, total)
        if last is not None and total > last[1]:
            self._value = min(1.0, max(0.0, (busy - last[0]) / (total - last[1])))
        return [self._value] * len(actors)


def _psutil_cpu_times() -> tuple[float, float]:
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return total - idle, total


class DeviceSampler:
    """The default sampler: each actor gets the utilisation of the device it runs on.

    An actor on device ``d`` gets ``d``'s utilisation, so every model sharing a GPU sees the
    contention the others cause. Actors on the CPU (``device is None``), and GPU actors whose
    device cannot be read (no NVML: one warning, then the fallback for good), get ``cpu``'s
    reading: by default the host CPU's utilisation (:class:`HostCpuSampler`). NVML is only initialised once some actor is placed on a GPU, so CPU-only setups
    never touch it. The last GPU readings are kept for the metrics collector.

    Args:
        gpus: where GPU readings come from; ``None`` means NVML (:class:`NvmlDevices`).
        cpu: the sampler for CPU actors and the fallback; ``None`` means :class:`HostCpuSampler`.
    """

    def __init__(
        self, gpus: GpuReader | None = None, cpu: UtilisationSampler | None = None
    ) -> None:
        self._gpus: GpuReader = NvmlDevices() if gpus is None else gpus
        self._cpu: UtilisationSampler = HostCpuSampler() if cpu is None else cpu
        self._readings: Mapping[int, DeviceReading] = {}
        self._missing: set[int] = set()

    def sample(self, actors: Sequence[ModelSnapshot], now: float) -> Sequence[float]:
        # The fallback sees every actor on every tick, so a GPU actor that falls back later
        # gets a reading over one interval rather than over its whole life.
        fallback = self._cpu.sample(actors, now)
        if all(a.device is None for a in actors):
            return list(fallback)
        readings = dict(self._gpus.read())
        self._readings = readings
        out = []
        for a, f in zip(actors, fallback, strict=True):
            reading = readings.get(a.device) if a.device is not None else None
            if reading is None:
                if a.device is not None and readings and a.device not in self._missing:
                    # NVML works but this index is not a visible device: a config mistake.
                    self._missing.add(a.device)
                    log.warning("gpu_device_not_found", model=a.name, device=a.device)
                out.append(f)
            else:
                out.append(reading.utilisation)
        return out

    def device_readings(self) -> Mapping[int, DeviceReading]:
        """The GPU readings of the last :meth:`sample` (empty before, or without NVML)."""
        return self._readings

    def close(self) -> None:
        """Release NVML, if this sampler opened it."""
        close = getattr(self._gpus, "close", None)
        if callable(close):
            close()


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """zeta's process: CPU seconds used so far (user + system), resident memory, threads."""

    cpu_seconds: float
    resident_memory_bytes: int
    threads: int


class ProcessSampler:
    """Reads this process's CPU time, RSS and thread count through psutil (for the metrics).

    Args:
        process: a ``psutil.Process``; ``None`` means the current process.
    """

    def __init__(self, process: Any = None) -> None:
        if process is None:
            import psutil

            process = psutil.Process()
        self._process = process

    def read(self) -> ProcessReading:
        """The current reading (a few microseconds; called at scrape time)."""
        p = self._process
        with p.oneshot():
            times = p.cpu_times()
            return ProcessReading(
                cpu_seconds=float(times.user + times.system),
                resident_memory_bytes=int(p.memory_info().rss),
                threads=int(p.num_threads()),
            )
