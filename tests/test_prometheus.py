"""A real Prometheus (Debian's ``prometheus`` package) scrapes zeta's endpoint.

The test starts Prometheus on loopback with a temporary config (one loopback target, nothing
else: no alertmanagers, no remote write, no service discovery) and data directory, waits (bounded)
until its HTTP API returns zeta's series, compares them with what zeta served, runs every
dashboard query through Prometheus's own parser and engine, and always stops the process.

Under ``CI=true`` a missing binary fails the test: ``.ci/run`` installs it with
``apt-get install -y --no-install-recommends prometheus``. Elsewhere it is skipped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_telemetry_dashboard import dashboard_exprs, interpolate

from zeta.telemetry import MetricsServer, serve_metrics

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
INSTALL = "apt-get update && apt-get install -y --no-install-recommends prometheus"
WAIT_S = 60.0  # bound on every wait; the scrape interval is 1 s, so it takes a few seconds

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )
    if path is None:
        message = f"Debian's prometheus binary is missing; install it with: {INSTALL}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


@dataclass
class Stack:
    zeta: MetricsServer
    url: str  # Prometheus's base URL
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        while True:
            self.check_alive()
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus never returned {what} for {expr!r}\n{self.log_tail()}")
            time.sleep(0.2)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"prometheus exited with {self.process.returncode}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def stack(
    populated_scheduler_shared: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    binary = prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    with serve_metrics(populated_scheduler_shared, "127.0.0.1", 0) as zeta:
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1m\n"
            "scrape_configs:\n"
            "  - job_name: zeta\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{zeta.port}']\n"
        )
        port = free_port()
        log = tmp / "prometheus.log"
        cmd = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        # A minimal environment: no proxy variables, no HOME with other configs.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp)}
        with log.open("wb") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        s = Stack(zeta, f"http://127.0.0.1:{port}", process, log)
        try:
            deadline = time.monotonic() + WAIT_S
            while True:
                s.check_alive()
                try:
                    if http_get(f"{s.url}/-/ready", timeout=1.0):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"Prometheus not ready after {WAIT_S}s\n{s.log_tail()}")
                time.sleep(0.1)
            yield s
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def served(stack: Stack) -> Series:
    """zeta's stable series as served on its endpoint (the process ones change every scrape)."""
    out: Series = {}
    for family in text_string_to_metric_families(http_get(stack.zeta.url).decode()):
        for s in family.samples:
            if not s.name.startswith("zeta_process_"):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def stored(stack: Stack) -> Series:
    out: Series = {}
    for r in stack.query('{__name__=~"zeta_.+", __name__!~"zeta_process_.+", job="zeta"}'):
        labels = dict(r["metric"])
        name = labels.pop("__name__")
        assert labels.pop("job") == "zeta"
        assert labels.pop("instance") == f"127.0.0.1:{stack.zeta.port}"
        out[(name, frozenset(labels.items()))] = float(r["value"][1])
    return out


def test_prometheus_stores_what_zeta_served(stack: Stack) -> None:
    stack.wait_for(
        'zeta_scheduler_requests_total{model="coder", kind="code", outcome="ok"}', "zeta's series"
    )
    [up] = stack.query('up{job="zeta"}')
    assert up["value"][1] == "1"
    [coder] = stack.query('zeta_scheduler_requests_total{model="coder", kind="code", outcome="ok"}')
    assert float(coder["value"][1]) == 7
    expected, got = served(stack), stored(stack)
    assert len(expected) > 100
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # A gauge with nothing to report yet (calibration before its first run) is NaN.
        same = math.isnan(value) and math.isnan(got[key])
        assert same or math.isclose(got[key], value, rel_tol=1e-12), (key, got[key], value)
    cpu = stack.wait_for('zeta_process_cpu_seconds_total{job="zeta"}', "the process CPU counter")
    assert float(cpu[0]["value"][1]) > 0


def test_every_dashboard_query_runs_and_returns_data(stack: Stack) -> None:
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        # Prometheus parses it (a syntax error is an HTTP 400) and, once it has two scrapes for
        # rate(), returns data for it.
        result = stack.wait_for(interpolate(expr), "data")
        assert result, expr
    # A quantile of a histogram whose buckets have not moved is NaN, but present per model/kind.
    p99 = stack.query(
        interpolate(
            "histogram_quantile(0.99, sum by (le, model, kind) "
            "(rate(zeta_scheduler_request_duration_seconds_bucket[$__rate_interval])))"
        )
    )
    assert {(r["metric"]["model"], r["metric"]["kind"]) for r in p99} >= {
        ("coder", "code"), ("coder", "simple"), ("embedder", "embed"), ("reasoner", "reason"),
    }  # fmt: skip


def test_prometheus_only_talks_to_loopback(stack: Stack) -> None:
    targets = stack.api("targets")
    assert targets["droppedTargets"] == []
    assert [t["scrapeUrl"] for t in targets["activeTargets"]] == [stack.zeta.url]
    assert stack.zeta.url.startswith("http://127.0.0.1:")
    managers = stack.api("alertmanagers")
    assert managers["activeAlertmanagers"] == []
    flags = stack.api("status/flags")
    assert flags["web.listen-address"].startswith("127.0.0.1:")
