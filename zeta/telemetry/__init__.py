"""Telemetry: resource samplers, Prometheus metrics and structured logging.

The Prometheus parts (``ZetaCollector``, ``serve_metrics``, ...) are imported on first use, so a
scheduler that never serves metrics never imports prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._logging import SENSITIVE_KEYS as SENSITIVE_KEYS
from ._logging import configure_logging as configure_logging
from ._logging import get_logger as get_logger
from ._logging import redact_sensitive as redact_sensitive
from ._logging import redacting as redacting
from ._nvml import DeviceReading as DeviceReading
from ._nvml import NvmlDevices as NvmlDevices
from ._recorder import LATENCY_BUCKETS as LATENCY_BUCKETS
from ._recorder import RecorderSnapshot as RecorderSnapshot
from ._samplers import BusyFractionSampler as BusyFractionSampler
from ._samplers import DeviceSampler as DeviceSampler
from ._samplers import GpuReader as GpuReader
from ._samplers import HostCpuSampler as HostCpuSampler
from ._samplers import ProcessReading as ProcessReading
from ._samplers import ProcessSampler as ProcessSampler
from ._samplers import UtilisationSampler as UtilisationSampler

if TYPE_CHECKING:
    from ._metrics import METRIC_NAMES as METRIC_NAMES
    from ._metrics import DeviceReadingSource as DeviceReadingSource
    from ._metrics import MetricsSource as MetricsSource
    from ._metrics import ZetaCollector as ZetaCollector
    from ._server import DEFAULT_METRICS_HOST as DEFAULT_METRICS_HOST
    from ._server import DEFAULT_METRICS_PORT as DEFAULT_METRICS_PORT
    from ._server import MetricsServer as MetricsServer
    from ._server import serve_metrics as serve_metrics

_LAZY = {
    "METRIC_NAMES": "._metrics",
    "DeviceReadingSource": "._metrics",
    "MetricsSource": "._metrics",
    "ZetaCollector": "._metrics",
    "DEFAULT_METRICS_HOST": "._server",
    "DEFAULT_METRICS_PORT": "._server",
    "MetricsServer": "._server",
    "serve_metrics": "._server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = (
    "BusyFractionSampler",
    "HostCpuSampler",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_METRICS_PORT",
    "DeviceReading",
    "DeviceReadingSource",
    "DeviceSampler",
    "GpuReader",
    "LATENCY_BUCKETS",
    "METRIC_NAMES",
    "MetricsServer",
    "MetricsSource",
    "NvmlDevices",
    "ProcessReading",
    "ProcessSampler",
    "RecorderSnapshot",
    "SENSITIVE_KEYS",
    "UtilisationSampler",
    "ZetaCollector",
    "configure_logging",
    "get_logger",
    "redact_sensitive",
    "redacting",
    "serve_metrics",
)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
