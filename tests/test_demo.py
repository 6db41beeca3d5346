"""``zeta demo`` and the ``zeta`` command line: a short real run on the tiny models."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (a hard dependency: a broken install must fail, not skip)
import pytest

import zeta.cli._demo
from zeta import Kind, Outcome, Priority
from zeta._types import Scoring
from zeta.cli import main
from zeta.cli._demo import (
    CODE_TOKENS,
    REASON_TOKENS,
    SIMPLE_TOKENS,
    DemoMetrics,
    DemoOptions,
    ModelSpeed,
    build_workload,
    phase_length,
    phase_rates,
    policy_report,
    run_demo,
)
from zeta.telemetry import serve_metrics
from zeta.telemetry._logging import _ZetaHandler
from zeta.testing._replay import RequestRecord, summarize

CODER, REASONER = ModelSpeed(0.0035, 0.0012), ModelSpeed(0.014, 0.005)


def test_workload_is_deterministic_with_a_calm_phase_then_a_surge() -> None:
    a = build_workload(10.0, CODER, REASONER, seed=1)
    assert a == build_workload(10.0, CODER, REASONER, seed=1)
    assert a != build_workload(10.0, CODER, REASONER, seed=2)
    assert [j.at for j in a] == sorted(j.at for j in a)
    assert all(0.0 <= j.at < 20.0 for j in a)
    assert all(j.surge == (j.at >= 10.0) for j in a)
    for phase in ([j for j in a if not j.surge], [j for j in a if j.surge]):
        assert {j.kind for j in phase} == {Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON}

    # The surge is reasoning: three times the calm rate, while the coder's kinds drop.
    def count(kind: Kind, surge: bool) -> int:
        return sum(j.kind is kind and j.surge == surge for j in a)

    assert count(Kind.REASON, True) > 2 * count(Kind.REASON, False)
    coder = (Kind.SIMPLE, Kind.CODE)
    assert sum(count(k, True) for k in coder) < sum(count(k, False) for k in coder)
    assert all(0.0 < (j.difficulty or 0) < 1.0 for j in a if j.kind is Kind.REASON)
    assert all(j.texts and not j.prompt for j in a if j.kind is Kind.EMBED)


def test_rates_follow_the_measured_capacity() -> None:
    rates = phase_rates(CODER, REASONER)
    # calm: half of each model's capacity (tokens at full occupancy); surge: 150% of the
    # reasoner's and 30% of the coder's.
    coder_busy = sum(
        rates["calm"][k] * n * CODER.full_s
        for k, n in ((Kind.SIMPLE, SIMPLE_TOKENS), (Kind.CODE, CODE_TOKENS))
    )
    assert coder_busy == pytest.approx(0.5)
    assert rates["calm"][Kind.REASON] * REASON_TOKENS * REASONER.full_s == pytest.approx(0.5)
    assert rates["surge"][Kind.REASON] * REASON_TOKENS * REASONER.full_s == pytest.approx(1.5)
    slow = phase_rates(ModelSpeed(0.007, 0.0024), ModelSpeed(0.028, 0.01))
    assert slow["surge"][Kind.REASON] == pytest.approx(rates["surge"][Kind.REASON] / 2)
    # Phases long enough for 200 requests each over two rounds (expected: 200 + 3 sigma).
    length = phase_length(rates, 200, 2)
    assert min(sum(r.values()) for r in rates.values()) * length * 2 == pytest.approx(242.4, 0.01)
    for seed in range(0, 20, 2):
        work = build_workload(length, CODER, REASONER, seed=seed) + build_workload(
            length, CODER, REASONER, seed=seed + 1
        )
        assert sum(not j.surge for j in work) >= 200 and sum(j.surge for j in work) >= 200


def test_policy_report_of_a_summary() -> None:
    def record(i: int, kind: Kind, outcome: Outcome, **fields: Any) -> RequestRecord:
        return RequestRecord(i, float(i), kind, Priority.NORMAL, outcome, **fields)

    records = [
        record(i, Kind.CODE, Outcome.OK, latency_s=(i + 1) / 100,
               model="coder" if i % 4 else "reasoner", tokens=4, spilled=i % 4 == 0)
        for i in range(100)
    ]  # fmt: skip
    records += [
        record(100, Kind.REASON, Outcome.OVERLOADED, error="Overloaded"),
        record(101, Kind.REASON, Outcome.DEADLINE, error="DeadlineExceeded"),
        record(102, Kind.EMBED, Outcome.ERROR, error="BackendError"),
        record(103, Kind.EMBED, Outcome.CANCELLED),
    ]
    s = policy_report(summarize(records, elapsed_s=10.0), {"coder": 5.0, "embedder": 0.0})
    json.dumps(s, allow_nan=False)
    code = s["kinds"]["code"]
    assert (code["p50_s"], code["p95_s"], code["p99_s"]) == (0.5, 0.95, 0.99)
    assert s["kinds"]["reason"] == {
        "requests": 2, "ok": 0, "p50_s": None, "p95_s": None, "p99_s": None
    }  # fmt: skip
    assert s["spilled_share"] == 0.25
    assert (s["rejected"], s["errors"], s["unfinished"]) == (2, 1, 1)
    assert s["throughput_rps"] == 10.0 and s["throughput_tokens_per_s"] == 40.0
    assert s["models"]["reasoner"] == {"requests": 25, "tokens": 100, "spilled_in": 25}
    assert s["models"]["coder"] == {"requests": 75, "tokens": 300, "spilled_in": 0}
    assert s["model_busy"] == {"coder": {"busy_share": 0.5}, "embedder": {"busy_share": 0.0}}


def _check_report(report: dict[str, Any]) -> None:
    assert set(report["policies"]) == {"static", "dynamic"}
    for run in report["policies"].values():
        assert run["errors"] == 0
        answered = sum(k["ok"] for k in run["kinds"].values())
        assert answered > 0 and run["throughput_rps"] > 0
        assert 0.0 <= run["spilled_share"] <= 1.0
        assert set(run["model_busy"]) == {"embedder", "coder", "reasoner"}
        for kind in run["kinds"].values():
            if kind["ok"]:
                assert 0 < kind["p50_s"] <= kind["p95_s"] <= kind["p99_s"]
    # static never spills: each kind goes to the model that prefers it
    assert report["policies"]["static"]["spilled_share"] == 0.0
    # Each phase holds its share of every policy's requests, the same workload for each.
    assert list(report["phases"]) == ["calm", "surge"]
    for policy, run in report["policies"].items():
        total = sum(k["requests"] for k in run["kinds"].values())
        phases = [report["phases"][phase][policy] for phase in ("calm", "surge")]
        assert sum(p["requests"] for p in phases) == total
        for p in phases:
            assert p["requests"] == sum(k["requests"] for k in p["kinds"].values())
            assert p["failed"] == 0
            if p["ok"]:
                assert 0 < p["p50_s"] <= p["p95_s"] <= p["p99_s"]
    for phase in report["phases"].values():
        assert phase["static"]["requests"] == phase["dynamic"]["requests"]
        assert phase["static"]["spilled_share"] == 0.0


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _requests_total(exposition: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in exposition.splitlines()
        if line.startswith("zeta_scheduler_requests_total{")
    )


class ScrapedAtEachStart(DemoMetrics):
    """Scrapes its own endpoint whenever the demo hands it a running scheduler."""

    def __init__(self) -> None:
        self.url = ""
        self.scrapes: list[str] = []
        super().__init__()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "scheduler" and value is not None:
            self.scrapes.append(_scrape(self.url))


def test_demo_runs_end_to_end_on_llama_cpp_and_serves_metrics(
    tiny_models: dict[str, Path], metrics_registry: Any
) -> None:
    options = DemoOptions(
        duration_s=3.0, seed=3, live=False, directory=tiny_models["coder-tiny"].parent,
        tiny=True, print_report=False,
    )  # fmt: skip
    metrics = ScrapedAtEachStart()
    with serve_metrics(metrics, port=0, registry=metrics_registry) as server:
        metrics.url = server.url
        report = run_demo(options, metrics=metrics)
        after = _scrape(server.url)
    _check_report(report)
    json.dumps(report, allow_nan=False)  # NaN became null
    # One scheduler per policy and round; each one's actors were served while it ran ...
    assert len(metrics.scrapes) == len(options.policies) * options.rounds
    for text in metrics.scrapes:
        for model in ("embedder", "coder", "reasoner"):
            assert f'zeta_actor_state{{model="{model}",replica="0",state="ready"}} 1.0' in text
    # ... and all of them counted into one recorder, so the counters only grow.
    totals = [_requests_total(text) for text in [*metrics.scrapes, after]]
    assert totals == sorted(totals) and totals[0] == 0 < totals[1]
    answered = sum(k["ok"] for run in report["policies"].values() for k in run["kinds"].values())
    ok = sum(
        n for (_, _, outcome), n in metrics.recorder.snapshot().requests.items() if outcome == "ok"
    )
    warmups = len(options.policies) * options.rounds * len(Kind.__members__)
    assert answered < ok <= answered + warmups
    assert "zeta_actor_state{" not in after  # no scheduler runs any more


def test_cli_demo_json_is_the_last_line_with_logs_and_metrics(tiny_models: dict[str, Path]) -> None:
    directory = str(tiny_models["coder-tiny"].parent)
    proc = subprocess.run(
        [sys.executable, "-m", "zeta", "demo", "--duration", "2", "--tiny", "--json",
         "--dir", directory, "--metrics-port", "0", "--log-json", "--log-level", "info"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    report = json.loads(last)
    _check_report(report)
    assert "p50 / p95 / p99" in proc.stdout  # the side-by-side table came first
    url = re.search(r"serving Prometheus metrics at (http://127\.0\.0\.1:\d+/metrics)", proc.stdout)
    assert url is not None
    # stderr carries zeta's logs, one JSON object per line.
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "metrics_server_started" and events[0]["url"] == url.group(1)
    assert names[-1] == "metrics_server_stopped"
    finished = [e for e in events if e["event"] == "request_finished"]
    assert finished and all(e["level"] == "info" and "prompt" not in e for e in finished)


def test_cli_demo_logs_and_metrics_are_opt_in(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[DemoMetrics | None] = []

    def fake_run_demo(options: DemoOptions, *, metrics: DemoMetrics | None = None) -> Any:
        calls.append(metrics)
        logging.getLogger("zeta.test").warning("demo_ran")
        return {}

    monkeypatch.setattr(zeta.cli._demo, "run_demo", fake_run_demo)
    assert main(["demo", "--no-live"]) == 0
    assert calls == [None]
    # configure_logging() was not called: zeta's loggers have no handler of their own.
    assert not [h for h in logging.getLogger("zeta").handlers if isinstance(h, _ZetaHandler)]
    assert not capsys.readouterr().err
    assert main(["demo", "--no-live", "--log-json", "--metrics-port", "0"]) == 0
    assert isinstance(calls[-1], DemoMetrics)
    out, err = capsys.readouterr()
    assert "serving Prometheus metrics at http://127.0.0.1:" in out
    events = [json.loads(line)["event"] for line in err.splitlines()]
    assert events == ["metrics_server_started", "demo_ran", "metrics_server_stopped"]


def test_cli_demo_set_builds_the_scoring_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Scoring] = []

    def fake_run_demo(options: DemoOptions, *, metrics: DemoMetrics | None = None) -> Any:
        seen.append(options.scoring)
        return {}

    monkeypatch.setattr(zeta.cli._demo, "run_demo", fake_run_demo)
    assert main(["demo", "--no-live"]) == 0
    assert main(["demo", "--no-live", "--set", "spill_penalty=0.5", "--set", " tau = 2"]) == 0
    assert seen == [Scoring(), Scoring(tau=2.0, spill_penalty=0.5)]


def test_python_m_zeta_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zeta", "--help"], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "models" in proc.stdout and "config" in proc.stdout


def test_cli_models_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "make", "embedder-tiny", "--dir", str(tmp_path)]) == 0
    assert "embedder-tiny" in capsys.readouterr().out
    assert len(list(tmp_path.glob("embedder-tiny-*.gguf"))) == 1
    assert main(["models", "list", "--dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "embedder-tiny" in listing and "cached" in listing and "not generated" in listing
    config = tmp_path / "zeta.toml"
    config.write_text("[[models]]\nname = 'm'\npath = 'x.gguf'\nkinds = ['code']\n")
    assert main(["config", "check", str(config)]) == 1  # no model for simple/embed/reason
    assert "no model serves kind 'simple'" in capsys.readouterr().err
    assert main(["models", "make", "nope", "--dir", str(tmp_path)]) == 1
    assert main(["demo", "--set", "bogus=1"]) == 1
    assert "--set takes KEY=NUMBER" in capsys.readouterr().err
    assert main(["demo", "--set", "tau=0"]) == 1  # the Scoring value rejects it
    assert "--set.tau: must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--metrics-port", "65536"])
    assert "a TCP port is an integer from 0 to 65535" in capsys.readouterr().err
