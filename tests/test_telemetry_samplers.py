"""Utilisation samplers: NVML per device mapped to actors, busy-fraction fallback, psutil."""

from __future__ import annotations

import os
import time
from typing import Any

import pynvml  # noqa: F401  (nvidia-ml-py is a dependency: a broken install must fail)
import pytest

from zeta.telemetry import (
    BusyFractionSampler,
    DeviceReading,
    DeviceSampler,
    HostCpuSampler,
    NvmlDevices,
    ProcessSampler,
)
from zeta.telemetry._nvml import visible_devices

GiB = 2**30


def two_gpus(fake_nvml: Any, **kw: Any) -> Any:
    return fake_nvml(
        [
            {"util": [10, 90], "used": 5 * GiB, "total": 80 * GiB, "uuid": "GPU-aaaa"},
            {"util": [40], "used": 7 * GiB, "total": 40 * GiB, "uuid": "GPU-bbbb"},
        ],
        **kw,
    )


def warnings_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name and e["log_level"] == "warning"]


def test_nvml_reads_utilisation_and_memory_per_device(fake_nvml: Any) -> None:
    nvml = two_gpus(fake_nvml)
    devices = NvmlDevices(nvml, env={})
    assert devices.available is None  # nothing touched before the first read
    first = devices.read()
    assert devices.available is True
    assert first == {
        0: DeviceReading(0, 0.10, 5 * GiB, 80 * GiB),
        1: DeviceReading(1, 0.40, 7 * GiB, 40 * GiB),
    }
    assert devices.read()[0].utilisation == pytest.approx(0.90)  # the script moves on
    assert nvml.init_calls == 1
    devices.close()
    assert nvml.shutdown_calls == 1
    assert devices.read() == {}


def test_device_sampler_maps_each_gpu_actor_to_its_device(fake_nvml: Any, make_actor: Any) -> None:
    """Two models sharing GPU 0 both see GPU 0's load; GPU 1's model sees GPU 1's."""
    sampler = DeviceSampler(gpus=NvmlDevices(two_gpus(fake_nvml), env={}))
    actors = [
        make_actor("coder", 0, device=0),
        make_actor("reasoner", 0, device=0),
        make_actor("embedder", 0, device=1),
    ]
    assert sampler.sample(actors, 1.0) == pytest.approx([0.10, 0.10, 0.40])
    assert sampler.sample(actors, 2.0) == pytest.approx([0.90, 0.90, 0.40])
    assert sampler.device_readings()[1] == DeviceReading(1, 0.40, 7 * GiB, 40 * GiB)


def test_cpu_actors_get_busy_fraction_beside_gpu_actors(fake_nvml: Any, make_actor: Any) -> None:
    sampler = DeviceSampler(
        gpus=NvmlDevices(two_gpus(fake_nvml), env={}), cpu=BusyFractionSampler()
    )
    first = [
        make_actor("gpu", device=1, busy_s=0.0),
        make_actor("cpu", busy_s=5.0, utilisation=0.3),
    ]
    # First tick: no interval yet, so the CPU actor keeps the utilisation it reported.
    assert sampler.sample(first, 10.0) == pytest.approx([0.40, 0.3])
    later = [make_actor("gpu", device=1, busy_s=1.0), make_actor("cpu", busy_s=6.5)]
    # 1.5 s busy over a 2 s interval.
    assert sampler.sample(later, 12.0) == pytest.approx([0.40, 0.75])


def test_cpu_only_setup_never_initialises_nvml(fake_nvml: Any, make_actor: Any) -> None:
    nvml = two_gpus(fake_nvml)
    sampler = DeviceSampler(gpus=NvmlDevices(nvml, env={}), cpu=BusyFractionSampler())
    sampler.sample([make_actor("a", busy_s=0.0)], 1.0)
    assert sampler.sample([make_actor("a", busy_s=0.5)], 2.0) == pytest.approx([0.5])
    assert nvml.init_calls == 0
    assert sampler.device_readings() == {}


@pytest.mark.parametrize(
    "error",
    [
        pytest.param("library", id="library-not-found"),
        pytest.param("driver", id="other-init-error"),
        pytest.param("import", id="import-error"),
    ],
)
def test_without_nvml_falls_back_to_busy_fraction_with_one_warning(
    fake_nvml: Any, make_actor: Any, captured_logs: list[dict[str, Any]], error: str
) -> None:
    exc = {
        "library": fake_nvml.NVMLError_LibraryNotFound("NVML Shared Library Not Found"),
        "driver": fake_nvml.NVMLError("Driver Not Loaded"),
        "import": ImportError("No module named 'pynvml'"),
    }[error]
    nvml = fake_nvml([{"util": [50], "used": 0, "total": 1}], init_error=exc)
    sampler = DeviceSampler(gpus=NvmlDevices(nvml, env={}), cpu=BusyFractionSampler())
    for t in range(1, 6):
        actors = [make_actor("gpu", device=0, busy_s=0.25 * t), make_actor("cpu", busy_s=0.5 * t)]
        readings = sampler.sample(actors, float(t))
    assert readings == pytest.approx([0.25, 0.5])  # busy fraction for both, never the fake's 50%
    assert nvml.init_calls == 1  # tried once, not on every tick
    warned = warnings_named(captured_logs, "nvml_unavailable")
    assert len(warned) == 1
    assert type(exc).__name__ in warned[0]["error"]
    assert sampler.device_readings() == {}


def test_real_pynvml_without_a_driver_falls_back(
    make_actor: Any, captured_logs: list[dict[str, Any]]
) -> None:
    """The real pynvml on this machine: either NVML works, or zeta falls back with one warning."""
    devices = NvmlDevices()
    try:
        sampler = DeviceSampler(gpus=devices, cpu=BusyFractionSampler())
        out = sampler.sample([make_actor("gpu", device=0, utilisation=0.2)], 1.0)
        if devices.available:
            assert 0.0 <= out[0] <= 1.0
            assert all(r.memory_total_bytes > 0 for r in sampler.device_readings().values())
        else:
            assert out == [0.2]
            assert len(warnings_named(captured_logs, "nvml_unavailable")) == 1
    finally:
        devices.close()


def test_failing_device_falls_back_with_one_warning(
    fake_nvml: Any, make_actor: Any, captured_logs: list[dict[str, Any]]
) -> None:
    sampler = DeviceSampler(
        gpus=NvmlDevices(two_gpus(fake_nvml, fail_reads=[1]), env={}), cpu=BusyFractionSampler()
    )
    for t in (1.0, 2.0, 3.0):
        out = sampler.sample(
            [make_actor("a", device=0), make_actor("b", device=1, busy_s=t, utilisation=0.6)], t
        )
    assert out[0] == pytest.approx(0.90)
    assert out[1] == pytest.approx(1.0)  # b's busy fraction: 1 s busy per 1 s
    failed = warnings_named(captured_logs, "nvml_read_failed")
    assert [e["device"] for e in failed] == [1]


def test_actor_on_an_unknown_device_falls_back_with_one_warning(
    fake_nvml: Any, make_actor: Any, captured_logs: list[dict[str, Any]]
) -> None:
    sampler = DeviceSampler(
        gpus=NvmlDevices(two_gpus(fake_nvml), env={}), cpu=BusyFractionSampler()
    )
    for t in (1.0, 2.0):
        out = sampler.sample([make_actor("typo", device=7, busy_s=0.5 * t)], t)
    assert out == [0.5]
    assert len(warnings_named(captured_logs, "gpu_device_not_found")) == 1


def test_cuda_visible_devices_renumbers_devices(fake_nvml: Any) -> None:
    """With CUDA_VISIBLE_DEVICES=1,0 CUDA's device 0 is NVML's device 1."""
    by_index = NvmlDevices(two_gpus(fake_nvml), env={"CUDA_VISIBLE_DEVICES": "1"}).read()
    assert by_index == {0: DeviceReading(0, 0.40, 7 * GiB, 40 * GiB)}
    swapped = NvmlDevices(two_gpus(fake_nvml), env={"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa"})
    readings = swapped.read()
    assert readings[0].memory_total_bytes == 40 * GiB
    assert readings[1].memory_total_bytes == 80 * GiB
    assert NvmlDevices(two_gpus(fake_nvml), env={"CUDA_VISIBLE_DEVICES": ""}).read() == {}


def test_visible_devices_parsing() -> None:
    assert visible_devices({}) is None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0, 2"}) == ["0", "2"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1,-1,0"}) == ["1"]  # CUDA stops at -1
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "MIG-x"}) == ["MIG-x"]


def test_host_cpu_sampler_gives_every_actor_the_hosts_reading(make_actor: Any) -> None:
    """CPU models share one device: each gets the host's utilisation over the last interval."""
    script = iter([(10.0, 40.0), (13.0, 44.0), (13.0, 48.0)])  # (busy, total) cpu-seconds
    s = HostCpuSampler(cpu_times=lambda: next(script))
    actors = [make_actor("coder", busy_s=9.0), make_actor("reasoner", busy_s=0.0)]
    assert s.sample(actors, 1.0) == [0.0, 0.0]  # no interval yet
    assert s.sample(actors, 2.0) == pytest.approx([0.75, 0.75])  # 3 of 4 core-seconds busy
    assert s.sample(actors, 3.0) == pytest.approx([0.0, 0.0])


def test_default_cpu_signal_is_the_hosts_not_the_actors_own(make_actor: Any) -> None:
    """A busy CPU model must not look slower than an idle one on the same cores.

    Its own busyness is already in its queue term; counting it again as contention made the
    router spill most of a burst onto a 4x slower model.
    """
    sampler = DeviceSampler(gpus=NvmlDevices(None, env={}))
    busy, idle = make_actor("coder", busy_s=0.0), make_actor("reasoner", busy_s=0.0)
    sampler.sample([busy, idle], 1.0)
    a, b = sampler.sample([make_actor("coder", busy_s=1.0), idle], 2.0)
    assert a == b
    assert 0.0 <= a <= 1.0


def test_real_host_cpu_reading_is_a_fraction(make_actor: Any) -> None:
    s = HostCpuSampler()
    s.sample([make_actor("a")], 0.0)
    # Busy for 0.2 s: many of the kernel's 10 ms accounting ticks, however loaded the host (a
    # fixed amount of work could end inside one tick and read as nothing).
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        sum(i * i for i in range(10_000))
    (u,) = s.sample([make_actor("a")], 1.0)
    assert 0.0 < u <= 1.0


def test_busy_fraction_is_clamped_and_per_replica(make_actor: Any) -> None:
    s = BusyFractionSampler()
    s.sample([make_actor("m", 0, busy_s=0.0), make_actor("m", 1, busy_s=0.0)], 0.0)
    out = s.sample([make_actor("m", 0, busy_s=5.0), make_actor("m", 1, busy_s=0.25)], 1.0)
    assert out == pytest.approx([1.0, 0.25])


def test_process_sampler_reads_this_process() -> None:
    before = ProcessSampler().read()
    sum(i * i for i in range(200_000))  # burn a little CPU
    after = ProcessSampler().read()
    assert after.cpu_seconds >= before.cpu_seconds > 0
    assert after.resident_memory_bytes > 10 * 2**20
    assert after.threads >= 1
    import psutil

    assert ProcessSampler(psutil.Process(os.getpid())).read().threads >= 1
