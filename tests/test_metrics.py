"""The Prometheus collector and the metrics endpoint, over a fake scheduler."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from zeta import Kind, ModelSpec, Outcome, Overloaded
from zeta._snapshot import ActorState
from zeta.telemetry import (
    DEFAULT_METRICS_HOST,
    LATENCY_BUCKETS,
    METRIC_NAMES,
    DeviceSampler,
    ZetaCollector,
    serve_metrics,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def exposition(source: Any, registry: Any, **kw: Any) -> str:
    registry.register(ZetaCollector(source, **kw))
    return generate_latest(registry).decode()


def test_exposes_every_family_with_recorded_values(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    text = exposition(populated_scheduler, metrics_registry, process=False)
    s = samples_of(text)
    assert value(s, "zeta_scheduler_requests_total", model="coder", kind="code", outcome="ok") == 7
    assert value(s, "zeta_scheduler_requests_total", model="none", kind="code",
                 outcome="overloaded") == 1  # fmt: skip
    assert value(s, "zeta_scheduler_spills_total", from_model="coder", to_model="reasoner") == 2
    assert value(s, "zeta_scheduler_overload_rejections_total", kind="code") == 1
    assert value(s, "zeta_scheduler_overload_rejections_total", kind="reason") == 0  # seeded
    assert value(s, "zeta_supervisor_restarts_total", model="reasoner") == 1
    assert value(s, "zeta_supervisor_restarts_total", model="coder") == 0  # seeded per model
    assert value(s, "zeta_calibration_runs_total") == 1
    assert value(s, "zeta_calibration_parameter_value", parameter="contention_weight") == 1.5
    assert value(s, "zeta_actor_queued_requests", model="coder", replica="0") == 3
    assert value(s, "zeta_actor_in_flight_requests", model="coder", replica="1") == 1
    assert value(s, "zeta_actor_ewma_token_seconds", model="reasoner", replica="0") == 0.03
    assert value(s, "zeta_actor_busy_seconds_total", model="reasoner", replica="0") == 40.0
    assert value(s, "zeta_actor_info", model="embedder", replica="0", device="1") == 1
    assert value(s, "zeta_actor_info", model="reasoner", replica="0", device="cpu") == 1
    assert value(s, "zeta_actor_state", model="reasoner", replica="0", state="restarting") == 1
    assert value(s, "zeta_actor_state", model="reasoner", replica="0", state="ready") == 0
    # The utilisation the sampler wrote: device 0's 75% for both coder replicas.
    assert value(s, "zeta_gpu_utilisation_ratio", device="0") == 0.75
    assert value(s, "zeta_gpu_memory_used_bytes", device="0") == 30 * 2**30
    assert value(s, "zeta_gpu_memory_total_bytes", device="1") == 80 * 2**30
    names = {name for name, _ in s}
    for family in METRIC_NAMES:
        if not family.startswith("zeta_process_"):
            assert names & {family, f"{family}_total", f"{family}_count"}, family


def test_histograms_are_cumulative_with_base_unit_buckets(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    s = samples_of(exposition(populated_scheduler, metrics_registry, process=False))
    name = "zeta_scheduler_service_seconds"
    buckets = [
        value(s, f"{name}_bucket", model="coder", kind="code", le=le)
        for le in [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
    ]
    assert buckets == sorted(buckets)  # cumulative
    assert buckets[-1] == value(s, f"{name}_count", model="coder", kind="code") == 7
    # service_s = 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.8; le is inclusive.
    assert value(s, f"{name}_bucket", model="coder", kind="code", le="0.25") == 2
    assert value(s, f"{name}_bucket", model="coder", kind="code", le="0.5") == 4
    assert value(s, f"{name}_sum", model="coder", kind="code") == pytest.approx(3.35)
    # A deadline miss has a queue wait and an end-to-end time but no service time.
    assert value(s, "zeta_scheduler_request_duration_seconds_count", model="reasoner",
                 kind="reason") == 2  # fmt: skip
    assert value(s, f"{name}_count", model="reasoner", kind="reason") == 1


def test_names_follow_the_convention(populated_scheduler: Any, metrics_registry: Any) -> None:
    text = exposition(populated_scheduler, metrics_registry)
    types = {
        name.removesuffix("_total") if kind == "counter" else name: kind
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)
    }
    assert set(types) == set(METRIC_NAMES)
    for name, kind in types.items():
        assert re.fullmatch(
            r"zeta_(scheduler|supervisor|calibration|actor|gpu|process)_[a-z_]+", name
        )
        assert not re.search(r"_(ms|milliseconds|kb|mb|gb|percent)(_|$)", name), name
        if kind == "histogram":  # of seconds, or of a count (sequences per decode step)
            assert name.endswith("_seconds") or name == "zeta_actor_batch_occupancy", name
    counters = {n for n, k in types.items() if k == "counter"}
    for name, _ in samples_of(text):
        if any(name.startswith(c) for c in counters):
            assert name.endswith("_total"), name


def test_label_values_come_only_from_config_and_enums(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    """Request content never becomes a label: an unknown kind is counted as "other"."""
    rec = populated_scheduler.recorder
    rec.request_finished(None, "please summarise my secret diary", Outcome.INVALID)
    rec.rejected("another free-form string")
    s = samples_of(exposition(populated_scheduler, metrics_registry))
    allowed = {
        "model": {"coder", "embedder", "reasoner", "none"},
        "from_model": {"coder", "reasoner"},
        "to_model": {"coder", "reasoner"},
        "kind": {k.value for k in Kind} | {"other"},
        "outcome": {o.value for o in Outcome},
        "state": {st.value for st in ActorState},
        "replica": {"0", "1"},
        "device": {"0", "1", "cpu"},
        "parameter": {"contention_weight", "spill_penalty_s"},
    }
    for name, labels in s:
        for label, v in labels:
            if label == "le":
                continue
            assert v in allowed[label], (name, label, v)
    assert value(s, "zeta_scheduler_requests_total", model="none", kind="other",
                 outcome="invalid") == 2  # fmt: skip
    assert value(s, "zeta_scheduler_overload_rejections_total", kind="other") == 1


def test_process_metrics_come_from_psutil(populated_scheduler: Any, metrics_registry: Any) -> None:
    s = samples_of(exposition(populated_scheduler, metrics_registry))
    assert value(s, "zeta_process_cpu_seconds_total") > 0
    assert value(s, "zeta_process_resident_memory_bytes") > 10 * 2**20
    assert value(s, "zeta_process_threads") >= 1


def test_scrape_reads_fresh_state_each_time(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    metrics_registry.register(ZetaCollector(populated_scheduler, process=False))
    before = samples_of(generate_latest(metrics_registry).decode())
    populated_scheduler.recorder.request_finished("coder", Kind.CODE, Outcome.OK, total_s=0.1)
    after = samples_of(generate_latest(metrics_registry).decode())
    key = {"model": "coder", "kind": "code", "outcome": "ok"}
    assert value(after, "zeta_scheduler_requests_total", **key) == (
        value(before, "zeta_scheduler_requests_total", **key) + 1
    )


def test_failed_snapshot_keeps_recorded_metrics(
    populated_scheduler: Any, metrics_registry: Any, captured_logs: list[dict[str, Any]]
) -> None:
    populated_scheduler.snapshot_error = RuntimeError("scheduler closed")
    s = samples_of(exposition(populated_scheduler, metrics_registry, process=False))
    assert value(s, "zeta_scheduler_requests_total", model="coder", kind="code", outcome="ok") == 7
    assert not any(name.startswith("zeta_actor_") for name, _ in s)
    assert [e["event"] for e in captured_logs if e["log_level"] == "warning"] == [
        "metrics_snapshot_failed"
    ]


def test_collector_describes_its_names_so_duplicates_are_rejected(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    metrics_registry.register(ZetaCollector(populated_scheduler))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics_registry.register(ZetaCollector(populated_scheduler))


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def test_serve_metrics_binds_loopback_and_closes_cleanly(populated_scheduler: Any) -> None:
    before = set(REGISTRY._names_to_collectors)
    server = serve_metrics(populated_scheduler, port=0)
    try:
        assert DEFAULT_METRICS_HOST == "127.0.0.1"
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        status, ctype, body = get(server.url)
        assert status == 200
        assert ctype.startswith("text/plain")
        s = samples_of(body)
        assert value(s, "zeta_actor_queued_requests", model="coder", replica="0") == 3
        assert server.registry is not REGISTRY
    finally:
        server.close()
    server.close()  # idempotent
    assert set(REGISTRY._names_to_collectors) == before  # the global registry was never touched
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zeta-metrics"]


def test_serve_metrics_is_silent_and_stops_its_thread(
    populated_scheduler: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """No access log line per scrape (nor anything else) on stdout or stderr; close joins."""
    with serve_metrics(populated_scheduler, port=0) as server:
        assert server.port != 0  # the port the OS picked, not the 0 asked for
        assert len(metrics_threads()) == 1
        for _ in range(3):
            assert get(server.url)[0] == 200
    assert metrics_threads() == []
    assert capfd.readouterr() == ("", "")


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_metrics_on_ipv6_loopback(populated_scheduler: Any) -> None:
    with serve_metrics(populated_scheduler, "::1", 0) as server:
        assert server.host == "::1"
        assert server.url == f"http://[::1]:{server.port}/metrics"
        status, _, body = get(server.url)
        assert status == 200 and "zeta_scheduler_requests_total" in body
    with pytest.raises(OSError), socket.create_connection(("::1", server.port), timeout=2):
        pass


def test_serve_metrics_into_a_given_registry_unregisters_on_close(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    with serve_metrics(populated_scheduler, "127.0.0.1", 0, registry=metrics_registry) as server:
        assert "zeta_actor_queued_requests" in generate_latest(metrics_registry).decode()
        assert server.registry is metrics_registry
    assert generate_latest(metrics_registry) == b""


def test_serve_metrics_taken_port_raises_and_leaves_registry_clean(
    populated_scheduler: Any, metrics_registry: Any
) -> None:
    with serve_metrics(populated_scheduler, port=0) as first:
        with pytest.raises(OSError):
            serve_metrics(populated_scheduler, port=first.port, registry=metrics_registry)
        assert generate_latest(metrics_registry) == b""


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_serve_metrics_async_close(populated_scheduler: Any, anyio_backend: str) -> None:
    async with serve_metrics(populated_scheduler, port=0) as server:
        status, _, body = await anyio.to_thread.run_sync(get, server.url)
        assert status == 200 and "zeta_scheduler_requests_total" in body
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 (polling snapshots: there is no event)
            await anyio.sleep(0.005)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_real_scheduler_on_the_simulated_backend(
    anyio_backend: str, metrics_registry: Any
) -> None:
    """A real Scheduler: requests, an overload and actor state show up on the endpoint."""
    from zeta._scheduler import Scheduler

    gate = threading.Event()
    models = [
        ModelSpec(
            "coder", backend="simulated", kinds=frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON}),
            preferred=frozenset({Kind.CODE, Kind.SIMPLE}), options={"gate": gate, "base_s": 0.002},
        ),
        ModelSpec("embedder", backend="simulated", kinds=frozenset({Kind.EMBED})),
    ]  # fmt: skip
    async with Scheduler(
        models=models, mailbox_capacity=1, admission_timeout=0, sample_interval=0.01
    ) as zs:
        assert isinstance(zs.sampler, DeviceSampler)  # the default
        with serve_metrics(zs, "127.0.0.1", 0, registry=metrics_registry) as server:
            gate.set()
            for i in range(3):
                await zs.complete(f"def f{i}(x):", kind="code", max_tokens=4)
            await zs.embed(["one", "two"])

            def coder() -> Any:
                return zs.snapshot().by_model("coder")[0]

            gate.clear()  # hold the coder busy: one request runs, one waits, the next is refused
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(zs.complete, "running", kind="code", max_tokens=2))
                await wait_until(lambda: coder().in_flight == 1)
                tg.start_soon(partial(zs.complete, "queued", kind="code", max_tokens=2))
                await wait_until(lambda: coder().queue_len == 1)
                mid = samples_of((await anyio.to_thread.run_sync(get, server.url))[2])
                with pytest.raises(Overloaded):
                    await zs.complete("refused", kind="code", max_tokens=2)
                gate.set()
            await anyio.sleep(0.05)  # a few sampler ticks
            _, _, body = await anyio.to_thread.run_sync(get, server.url)
    assert value(mid, "zeta_actor_in_flight_requests", model="coder", replica="0") == 1
    assert value(mid, "zeta_actor_queued_requests", model="coder", replica="0") == 1
    s = samples_of(body)
    assert value(s, "zeta_scheduler_requests_total", model="coder", kind="code", outcome="ok") == 5
    assert value(s, "zeta_scheduler_requests_total", model="embedder", kind="embed",
                 outcome="ok") == 1  # fmt: skip
    assert value(s, "zeta_scheduler_overload_rejections_total", kind="code") == 1
    overloaded = [v for (n, labels), v in s.items()
                  if n == "zeta_scheduler_requests_total" and ("outcome", "overloaded") in labels]  # fmt: skip
    assert overloaded == [1]
    assert value(s, "zeta_scheduler_service_seconds_count", model="coder", kind="code") == 5
    assert value(s, "zeta_scheduler_service_seconds_sum", model="coder", kind="code") >= 0.01
    assert value(s, "zeta_actor_busy_seconds_total", model="coder", replica="0") >= 0.01
    assert value(s, "zeta_actor_info", model="coder", replica="0", device="cpu") == 1
    assert value(s, "zeta_actor_state", model="embedder", replica="0", state="ready") == 1
    assert value(s, "zeta_supervisor_restarts_total", model="coder") == 0
    assert 0.0 <= value(s, "zeta_actor_utilisation_ratio", model="coder", replica="0") <= 1.0
    assert not any(name.startswith("zeta_gpu_") for name, _ in s)  # no GPU model, no NVML


def test_public_telemetry_surface_and_lazy_prometheus_import() -> None:
    """Everything in ``__all__`` resolves; prometheus_client loads only when metrics are used."""
    code = (
        "import sys, zeta, zeta.telemetry as t\n"
        "assert 'prometheus_client' not in sys.modules, 'imported too early'\n"
        "missing = [n for n in t.__all__ if not hasattr(t, n)]\n"
        "assert not missing, missing\n"
        "assert 'prometheus_client' in sys.modules\n"
        "assert set(t.__all__) <= set(dir(t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
