"""GPU utilisation and memory through NVML, imported lazily and never fatal.

``pynvml`` (from the ``nvidia-ml-py`` package) is imported on the first reading, not at import,
and only when some model is placed on a GPU. Without a driver (``NVMLError_LibraryNotFound``) or
with any other initialisation error, :class:`NvmlDevices` logs one warning and reports no
devices; callers fall back to other signals.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._logging import get_logger

__all__ = ["DeviceReading", "NvmlDevices", "visible_devices"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """One GPU at one instant.

    ``index`` is zeta's device index (``ModelSpec.device``: the CUDA index llama.cpp uses),
    ``utilisation`` the fraction of NVML's last sample period (1/6 s to 1 s, by GPU) in which
    a kernel was running, from 0 to 1.
    """

    index: int
    utilisation: float
    memory_used_bytes: int
    memory_total_bytes: int


def visible_devices(env: Mapping[str, str] | None = None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-``/``MIG-`` UUIDs), if set.

    CUDA numbers the visible devices 0, 1, ... in this order, so zeta device ``i`` is the ``i``-th
    entry. CUDA ignores everything from the first invalid entry on; so does this.
    """
    raw = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    out: list[str] = []
    for entry in (e.strip() for e in raw.split(",")):
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            out.append(entry)
        else:
            break
    return out


class NvmlDevices:
    """Reads utilisation and memory of every visible GPU through NVML.

    Thread-safe; initialises NVML on the first :meth:`read`. Device ``i`` is the ``i``-th device
    CUDA sees: ``CUDA_VISIBLE_DEVICES`` is honoured; without it, NVML's order is used, which
    matches CUDA's when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (or on hosts with one GPU model).

    Args:
        nvml: an object with pynvml's API (``nvmlInit``, ``nvmlDeviceGetCount``,
            ``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetHandleByUUID``,
            ``nvmlDeviceGetUtilizationRates``, ``nvmlDeviceGetMemoryInfo``, ``nvmlShutdown``).
            ``None`` imports ``pynvml``. Tests pass a fake with scripted readings.
        env: environment to read ``CUDA_VISIBLE_DEVICES`` from (``os.environ`` if ``None``).
    """

    def __init__(self, nvml: Any = None, *, env: Mapping[str, str] | None = None) -> None:
        self._nvml = nvml
        self._env = env
        self._lock = threading.Lock()
        self._state = "new"  # new -> ready | unavailable -> closed
        self._handles: dict[int, Any] = {}
        self._failed: set[int] = set()  # devices whose read failure was already logged

    @property
    def available(self) -> bool | None:
        """``True`` once NVML is up, ``False`` if it could not be, ``None`` before trying."""
        return {"new": None, "ready": True}.get(self._state, False)

    def _init(self) -> None:
        try:
            nvml = self._nvml if self._nvml is not None else importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            self._state = "unavailable"
            log.warning(
                "nvml_unavailable",
                error=f"{type(exc).__name__}: {exc}",
                fallback="host CPU utilisation for every model",
            )
            return
        self._nvml = nvml
        try:
            entries = visible_devices(self._env)
            if entries is None:
                entries = [str(i) for i in range(int(nvml.nvmlDeviceGetCount()))]
            for index, entry in enumerate(entries):
                if entry.isdigit():
                    self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(int(entry))
                else:
                    self._handles[index] = nvml.nvmlDeviceGetHandleByUUID(entry)
        except Exception as exc:
            self._handles.clear()
            self._state = "unavailable"
            log.warning("nvml_unavailable", error=f"{type(exc).__name__}: {exc}")
            self._shutdown()
            return
        self._state = "ready"
        log.info("nvml_ready", devices=len(self._handles))

    def read(self) -> dict[int, DeviceReading]:
        """Current readings by device index; empty without NVML. Never raises.

        A device that fails to read (lost, or a MIG slice without utilisation counters) is left
        out, with one warning per device.
        """
        with self._lock:
            if self._state == "new":
                self._init()
            if self._state != "ready":
                return {}
            out: dict[int, DeviceReading] = {}
            for index, handle in self._handles.items():
                try:
                    util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                    mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                    out[index] = DeviceReading(
                        index=index,
                        utilisation=min(1.0, max(0.0, float(util.gpu) / 100.0)),
                        memory_used_bytes=int(mem.used),
                        memory_total_bytes=int(mem.total),
                    )
                except Exception as exc:
                    if index not in self._failed:
                        self._failed.add(index)
                        log.warning(
                            "nvml_read_failed", device=index, error=f"{type(exc).__name__}: {exc}"
                        )
            return out

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvml_shutdown_failed", error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Shut NVML down (if it was initialised); later reads return nothing."""
        with self._lock:
            if self._state == "ready":
                self._shutdown()
            self._handles.clear()
            self._state = "closed"
