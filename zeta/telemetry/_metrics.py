"""Prometheus metrics: a custom collector that reads zeta's snapshots at scrape time.

The request path never touches prometheus_client: the runtime writes plain counters into the
:class:`~zeta.Recorder`, and :class:`ZetaCollector` turns the recorder's snapshot, the
scheduler's snapshot, the last GPU readings and psutil's process reading into metric families
when Prometheus scrapes. Names follow ``zeta_<subsystem>_<name>_<unit>`` in base units; label
values come only from config (model names, device indices) and enums (kind, outcome, state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .._snapshot import ActorState, SchedulerSnapshot
from .._types import Kind
from ._logging import get_logger
from ._nvml import DeviceReading
from ._recorder import Histogram, Recorder, RecorderSnapshot
from ._samplers import ProcessSampler

__all__ = ["DeviceReadingSource", "MetricsSource", "ZetaCollector", "METRIC_NAMES"]

log = get_logger(__name__)


class MetricsSource(Protocol):
    """What the collector needs from a scheduler: its recorder and a snapshot of its actors.

    ``snapshot()`` is called from the metrics server's thread, so it must be safe to call from
    outside the event loop (copy the actor list before iterating; build frozen snapshots).
    """

    @property
    def recorder(self) -> Recorder: ...

    def snapshot(self) -> SchedulerSnapshot: ...


@runtime_checkable
class DeviceReadingSource(Protocol):
    """Keeps the last GPU readings, as :class:`~zeta.telemetry.DeviceSampler` does."""

    def device_readings(self) -> Mapping[int, DeviceReading]: ...


# name -> (type, help, label names). Histogram and counter names are given without their sample
# suffixes; the exposition adds ``_bucket``/``_sum``/``_count`` and ``_total``.
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "zeta_scheduler_requests": (
        "counter", "Finished requests by serving model, kind and outcome.",
        ("model", "kind", "outcome"),
    ),
    "zeta_scheduler_queue_wait_seconds": (
        "histogram", "Time from admission to the start of service.", ("model", "kind"),
    ),
    "zeta_scheduler_service_seconds": (
        "histogram", "Time inside the backend call.", ("model", "kind"),
    ),
    "zeta_scheduler_request_duration_seconds": (
        "histogram", "End-to-end request latency, admission wait included.", ("model", "kind"),
    ),
    "zeta_scheduler_spills": (
        "counter", "Requests sent to another model than the one preferred for their kind.",
        ("from_model", "to_model"),
    ),
    "zeta_scheduler_overload_rejections": (
        "counter", "Admissions refused with Overloaded, by request kind.", ("kind",),
    ),
    "zeta_supervisor_restarts": ("counter", "Actor restarts by the supervisor.", ("model",)),
    "zeta_calibration_runs": ("counter", "Finished calibration runs.", ()),
    "zeta_calibration_parameter_value": (
        "gauge", "Current value of each calibrated scoring parameter.", ("parameter",),
    ),
    "zeta_calibration_applied": (
        "counter", "Calibration runs that applied a tuned parameter change.", (),
    ),
    "zeta_calibration_rejected": (
        "counter", "Calibration runs whose candidates did not beat the current parameters.", (),
    ),
    "zeta_calibration_rolled_back": (
        "counter", "Calibration runs that rolled a change back to the last good parameters.", (),
    ),
    "zeta_calibration_failed": (
        "counter", "Calibration runs that raised (routing kept the last good parameters).", (),
    ),
    "zeta_calibration_live_objective_seconds": (
        "gauge", "The objective (default p95 latency) of the last calibration window, live.", (),
    ),
    "zeta_calibration_predicted_before_seconds": (
        "gauge", "The replayed objective of the parameters in force before the last run.", (),
    ),
    "zeta_calibration_predicted_after_seconds": (
        "gauge", "The replayed objective of the parameters the last run left in force.", (),
    ),
    "zeta_calibration_fit_call_seconds": (
        "gauge", "Fitted per-call overhead to the first token (NaN before a fit).", ("model",),
    ),
    "zeta_calibration_fit_prefill_token_seconds": (
        "gauge", "Fitted prefill time per prompt token (NaN before a fit).", ("model",),
    ),
    "zeta_calibration_fit_token_seconds": (
        "gauge", "Fitted decode time per output token at one sequence (NaN before a fit).",
        ("model",),
    ),
    "zeta_calibration_fit_step_slope_ratio": (
        "gauge", "Fitted step-time growth per extra busy sequence (NaN before a fit).", ("model",),
    ),
    "zeta_calibration_fit_co_slow_ratio": (
        "gauge", "Fitted step slowdown per other busy model on the device (NaN before a fit).",
        ("model",),
    ),
    "zeta_actor_queued_requests": (
        "gauge", "Requests waiting in the actor's mailbox.", ("model", "replica"),
    ),
    "zeta_actor_in_flight_requests": (
        "gauge", "Requests the actor is serving now (its busy slots).", ("model", "replica"),
    ),
    "zeta_actor_slots": (
        "gauge", "Requests the actor's context can decode together.", ("model", "replica"),
    ),
    "zeta_actor_batch_occupancy": (
        "histogram", "Sequences in each decode step of the actor's context.", ("model", "replica"),
    ),
    "zeta_actor_generated_tokens": (
        "counter", "Completion tokens of the requests the actor finished.", ("model", "replica"),
    ),
    "zeta_actor_prefix_cache_hits": (
        "counter", "Admissions that reused a prompt prefix already in the KV cache.",
        ("model", "replica"),
    ),
    "zeta_actor_prefix_cache_reused_tokens": (
        "counter", "Prompt tokens not prefilled thanks to the prefix cache.", ("model", "replica"),
    ),
    "zeta_actor_ewma_request_seconds": (
        "gauge", "Peak-EWMA estimate of the per-request service time.", ("model", "replica"),
    ),
    "zeta_actor_ewma_token_seconds": (
        "gauge", "Peak-EWMA estimate of the per-token service time.", ("model", "replica"),
    ),
    "zeta_actor_utilisation_ratio": (
        "gauge", "Utilisation the router sees: the device's (NVML for GPU models, host CPU for CPU models).",
        ("model", "replica"),
    ),
    "zeta_actor_busy_seconds": (
        "counter", "Time the actor spent inside inference calls.", ("model", "replica"),
    ),
    "zeta_actor_state": (
        "gauge", "1 for the actor's current lifecycle state, 0 for the others.",
        ("model", "replica", "state"),
    ),
    "zeta_actor_info": (
        "gauge", "Placement of each actor: device is a GPU index or 'cpu'.",
        ("model", "replica", "device"),
    ),
    "zeta_gpu_utilisation_ratio": (
        "gauge", "Fraction of NVML's sample period in which the GPU ran a kernel.", ("device",),
    ),
    "zeta_gpu_memory_used_bytes": ("gauge", "GPU memory in use (all processes).", ("device",)),
    "zeta_gpu_memory_total_bytes": ("gauge", "GPU memory installed.", ("device",)),
    "zeta_process_cpu_seconds": ("counter", "CPU time of the zeta process (user + system).", ()),
    "zeta_process_resident_memory_bytes": ("gauge", "Resident memory of the zeta process.", ()),
    "zeta_process_threads": ("gauge", "Threads in the zeta process.", ()),
}  # fmt: skip

#: Every metric family name zeta exposes (counters without their ``_total`` suffix).
METRIC_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def _go_float(value: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``, ``0.5``, ``1.0``)."""
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _unit(name: str) -> str:
    for unit in ("seconds", "bytes", "ratio"):
        if name.endswith(f"_{unit}"):
            return unit
    return ""


class _Families:
    """Builds the metric families of one scrape."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        for name, (kind, doc, labels) in _FAMILIES.items():
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, doc, labels=labels)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, doc, labels=labels, unit=_unit(name))
            else:
                family = HistogramMetricFamily(name, doc, labels=labels, unit=_unit(name))
            self.families[name] = family

    def add(self, name: str, labels: Iterable[str], value: float) -> None:
        family = self.families[name]
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric(list(labels), value)

    def occupancy(self, labels: Iterable[str], steps_by_occupancy: Sequence[int]) -> None:
        """The batch-occupancy histogram from per-occupancy step counts (buckets 1, 2, 4, ...)."""
        family = self.families["zeta_actor_batch_occupancy"]
        assert isinstance(family, HistogramMetricFamily)
        buckets: list[tuple[str, float]] = []
        total = 0
        bound = 1
        for k, n in enumerate(steps_by_occupancy, start=1):
            while k > bound:
                buckets.append((str(bound), float(total)))
                bound *= 2
            total += n
        buckets.append((str(bound), float(total)))
        buckets.append(("+Inf", float(total)))
        family.add_metric(
            list(labels), buckets, float(sum(k * n for k, n in enumerate(steps_by_occupancy, 1)))
        )

    def histogram(self, name: str, labels: Iterable[str], h: Histogram) -> None:
        family = self.families[name]
        assert isinstance(family, HistogramMetricFamily)
        buckets = [(_go_float(bound), float(n)) for bound, n in h.cumulative()]
        family.add_metric(list(labels), buckets, h.sum)


class ZetaCollector(Collector):
    """Reads a scheduler's recorder and snapshot (and GPU and process readings) at scrape time.

    Register it with a ``CollectorRegistry`` (or use :func:`~zeta.telemetry.serve_metrics`).

    Args:
        source: the scheduler, or anything with ``recorder`` and ``snapshot()``.
        devices: where the last GPU readings come from; ``None`` uses ``source.sampler`` if that
            keeps readings (the default :class:`~zeta.telemetry.DeviceSampler` does).
        process: the process reader; ``None`` reads this process through psutil, ``False``
            leaves the ``zeta_process_*`` families out.
    """

    def __init__(
        self,
        source: MetricsSource,
        *,
        devices: DeviceReadingSource | None = None,
        process: ProcessSampler | bool | None = None,
    ) -> None:
        self._source = source
        if devices is None:
            sampler = getattr(source, "sampler", None)
            devices = sampler if isinstance(sampler, DeviceReadingSource) else None
        self._devices = devices
        self._process: ProcessSampler | None
        if process is None or process is True:
            self._process = ProcessSampler()
        elif process is False:
            self._process = None
        else:
            self._process = process

    def describe(self) -> Iterable[Metric]:
        """Every family, without samples: lets a registry reject duplicate names up front."""
        return list(_Families().families.values())

    def collect(self) -> Iterable[Metric]:
        """One scrape's metric families. A failing part is logged and left out, never raised."""
        f = _Families()
        recorded = self._source.recorder.snapshot()
        snapshot: SchedulerSnapshot | None
        try:
            snapshot = self._source.snapshot()
        except Exception as exc:
            snapshot = None
            log.warning("metrics_snapshot_failed", error=f"{type(exc).__name__}: {exc}")
        models = sorted({a.name for a in snapshot.models}) if snapshot is not None else []
        self._recorder(f, recorded, models)
        self._calibration(f, models)
        if snapshot is not None:
            self._actors(f, snapshot)
        if self._devices is not None:
            self._gpus(f, self._devices.device_readings())
        if self._process is not None:
            try:
                p = self._process.read()
            except Exception as exc:
                log.warning("metrics_process_read_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                f.add("zeta_process_cpu_seconds", (), p.cpu_seconds)
                f.add("zeta_process_resident_memory_bytes", (), p.resident_memory_bytes)
                f.add("zeta_process_threads", (), p.threads)
        return [family for family in f.families.values() if family.samples]

    @staticmethod
    def _recorder(f: _Families, r: RecorderSnapshot, models: Iterable[str]) -> None:
        for (model, kind, outcome), n in sorted(r.requests.items()):
            f.add("zeta_scheduler_requests", (model, kind, outcome), n)
        for name, hists in (
            ("zeta_scheduler_queue_wait_seconds", r.queue_wait),
            ("zeta_scheduler_service_seconds", r.service),
            ("zeta_scheduler_request_duration_seconds", r.latency),
        ):
            for (model, kind), h in sorted(hists.items()):
                f.histogram(name, (model, kind), h)
        for (src, dst), n in sorted(r.spills.items()):
            f.add("zeta_scheduler_spills", (src, dst), n)
        # Series that alerts watch start at 0 for every known model and kind, so increase() and
        # absent-data checks see a value from the first scrape.
        rejections = {k.value: 0 for k in Kind} | dict(r.rejections)
        for kind, n in sorted(rejections.items()):
            f.add("zeta_scheduler_overload_rejections", (kind,), n)
        restarts = dict.fromkeys(models, 0) | dict(r.restarts)
        for model, n in sorted(restarts.items()):
            f.add("zeta_supervisor_restarts", (model,), n)
        f.add("zeta_calibration_runs", (), r.calibration_runs)
        for param, value in sorted(r.calibration_params.items()):
            f.add("zeta_calibration_parameter_value", (param,), value)

    def _calibration(self, f: _Families, models: Iterable[str]) -> None:
        """The calibrator's counters, last objectives and fits (``source.calibration_state()``
        when the source has one); every series is present from the first scrape (0, NaN)."""
        state: Any = None
        reader = getattr(self._source, "calibration_state", None)
        if callable(reader):
            try:
                state = reader()
            except Exception as exc:
                log.warning("metrics_calibration_failed", error=f"{type(exc).__name__}: {exc}")
        counts: Mapping[str, int] = getattr(state, "counts", None) or {}
        for action in ("applied", "rejected", "rolled_back", "failed"):
            f.add(f"zeta_calibration_{action}", (), counts.get(action, 0))
        last = getattr(state, "last", None)
        nan = math.nan
        for name, attr in (
            ("zeta_calibration_live_objective_seconds", "objective"),
            ("zeta_calibration_predicted_before_seconds", "predicted_before"),
            ("zeta_calibration_predicted_after_seconds", "predicted_after"),
        ):
            f.add(name, (), float(getattr(last, attr, nan)))
        fits: Mapping[str, Any] = getattr(state, "fits", None) or {}
        for model in sorted(set(models) | set(fits)):
            fit = fits.get(model)
            for name, attr in (
                ("zeta_calibration_fit_call_seconds", "call_s"),
                ("zeta_calibration_fit_prefill_token_seconds", "prefill_token_s"),
                ("zeta_calibration_fit_token_seconds", "token_s"),
                ("zeta_calibration_fit_step_slope_ratio", "step_slope"),
                ("zeta_calibration_fit_co_slow_ratio", "co_slow"),
            ):
                f.add(name, (model,), float(getattr(fit, attr, nan)))

    @staticmethod
    def _actors(f: _Families, snapshot: SchedulerSnapshot) -> None:
        for a in snapshot.models:
            labels = (a.name, str(a.replica))
            f.add("zeta_actor_queued_requests", labels, a.queue_len)
            f.add("zeta_actor_in_flight_requests", labels, a.in_flight)
            f.add("zeta_actor_slots", labels, a.slots)
            f.occupancy(labels, a.steps_by_occupancy)
            f.add("zeta_actor_generated_tokens", labels, a.generated_tokens)
            f.add("zeta_actor_prefix_cache_hits", labels, a.prefix_hits)
            f.add("zeta_actor_prefix_cache_reused_tokens", labels, a.prefix_tokens_reused)
            f.add("zeta_actor_ewma_request_seconds", labels, a.ewma_request_s)
            f.add("zeta_actor_ewma_token_seconds", labels, a.ewma_token_s)
            f.add("zeta_actor_utilisation_ratio", labels, a.utilisation)
            f.add("zeta_actor_busy_seconds", labels, a.busy_s)
            for state in ActorState:
                f.add("zeta_actor_state", (*labels, state.value), float(state == a.state))
            device = "cpu" if a.device is None else str(a.device)
            f.add("zeta_actor_info", (*labels, device), 1.0)

    @staticmethod
    def _gpus(f: _Families, readings: Mapping[int, DeviceReading]) -> None:
        for index, d in sorted(readings.items()):
            labels = (str(index),)
            f.add("zeta_gpu_utilisation_ratio", labels, d.utilisation)
            f.add("zeta_gpu_memory_used_bytes", labels, d.memory_used_bytes)
            f.add("zeta_gpu_memory_total_bytes", labels, d.memory_total_bytes)
