"""Each benchmark runs from the command line and ends with one JSON object (smoke runs, tiny
sizes; the figures themselves are measured by running the benchmarks, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str, tmp_path: Path) -> dict[str, object]:
    env = dict(os.environ, ZETA_CACHE_DIR=str(tmp_path / "models"))
    out = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_kernel_bench_reports_every_size_and_ratio(tmp_path: Path) -> None:
    result = run_bench("kernel", "--repeat", "1", tmp_path=tmp_path)
    rows = result["results"]
    assert isinstance(rows, list)
    assert [r["n"] for r in rows] == [2, 3, 8, 32, 128]
    for r in rows:
        assert r["c_choose_ns"] > 0 and r["py_choose_ns"] > 0
        assert r["speedup_choose"] == pytest.approx(r["py_choose_ns"] / r["c_choose_ns"], rel=0.05)


def test_overhead_bench_compares_zeta_with_the_bare_baseline(tmp_path: Path) -> None:
    result = run_bench("overhead", "--requests", "200", tmp_path=tmp_path)
    rows = result["results"]
    assert isinstance(rows, list)
    names = {r["name"] for r in rows}
    assert {"bare/to_thread", "zeta/thread"} <= names
    assert {r["concurrency"] for r in rows} == {1, 64}


def test_policies_bench_runs_every_scenario_in_the_simulator(tmp_path: Path) -> None:
    result = run_bench("policies", "--seeds", "2", "--requests", "150", tmp_path=tmp_path)
    assert result["mode"] == "sim" and result["seeds"] == [0, 1]
    scenarios = result["scenarios"]
    assert isinstance(scenarios, dict)
    assert set(scenarios) == {
        "calm", "steady", "bursty", "surge", "overwhelm", "fanout", "heavy_tail", "drift",
    }  # fmt: skip
    contenders = {
        "static", "threshold", "dynamic", "round_robin", "jsq", "p2c", "peak_ewma", "oracle",
        "oracle_pen",
    }  # fmt: skip
    for s in scenarios.values():
        assert set(s["policies"]) == contenders
        dynamic = s["policies"]["dynamic"]
        assert dynamic["p99"]["n"] == 2 and len(dynamic["p99"]["ci95"]) == 2
        assert {"p50/static", "p99/static", "mean/oracle", "quality"} <= set(dynamic)
        # Against the oracle that pays the same penalties (oracle_pen), seed by seed.
        assert dynamic["mean/oracle_pen"]["median"] > 0
        assert s["policies"]["static"]["p99/static"]["median"] == 1.0
        assert len(s["per_seed"]["dynamic"]) == 2
    targets = result["targets"]
    assert isinstance(targets, list)
    assert {t["target"].split(":")[0] for t in targets} >= {"surge", "calm"}
    assert all(t["passed"] in (True, False, None) for t in targets)
    assert result["speed"]["shipped_policies"]["wall"] > 0


def test_policies_bench_takes_its_contenders_and_scenarios(tmp_path: Path) -> None:
    result = run_bench(
        "policies", "--seeds", "1", "--requests", "100", "--scenarios", "surge",
        "--policies", "dynamic", "dynamic:contention_weight=0", "--fleet", "gpu",
        tmp_path=tmp_path,
    )  # fmt: skip
    (surge,) = result["scenarios"].values()
    # The baseline and the oracle are always run: the ratios need them.
    assert set(surge["policies"]) == {"static", "dynamic", "dynamic:contention_weight=0", "oracle"}


def test_policies_bench_replays_scenarios_on_the_real_ladder(tmp_path: Path) -> None:
    result = run_bench(
        "policies", "--real", "--tiny", "--scenarios", "surge", "--requests", "40",
        "--duration", "1.5", "--rounds", "2", "--policies", "dynamic", "--priors",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result["mode"] == "real" and result["priors"] is True
    scenarios = result["scenarios"]
    assert isinstance(scenarios, dict) and set(scenarios) == {"surge"}
    surge = scenarios["surge"]
    n = surge["requests"]
    assert 30 <= n <= 50  # about --requests
    # The baseline is always run: the ratios need it.
    for label in ("static", "dynamic"):
        row = surge[label]
        assert row["failed"] == 0
        assert row["latency"]["served"] == 2 * n  # both rounds, every request answered
        assert len(row["per_round_ratio_to_static"]["p99"]) == 2
        assert row["sim"]["served"] == n
    assert surge["static"]["spilled_share"] == 0.0
    assert {t["scenario"] for t in result["targets"]} == {"surge"}
    assert len(result["targets"]) == 3


def test_llama_bench_sweeps_in_flight_levels_for_every_contender(tmp_path: Path) -> None:
    result = run_bench(
        "llama", "--tiny", "--models", "coder-tiny", "--in-flight", "1,2", "--waves", "1",
        "--tokens", "4", "--rounds", "1", "--llama-server", str(tmp_path / "none"),
        tmp_path=tmp_path,
    )  # fmt: skip
    rows = result["results"]
    assert isinstance(rows, list)
    (row,) = rows
    assert row["model"] == "coder-tiny"
    assert [level["in_flight"] for level in row["levels"]] == [1, 2]
    for level in row["levels"]:
        assert set(level["contenders"]) == {"zeta", "zeta slots=1", "bare loop"}
        assert set(level["ratios"]) == {"zeta/zeta slots=1", "zeta/bare loop"}
    assert "llama-server" in row["skipped"]  # no binary there: skipped, not failed


def test_serve_bench_compares_http_with_in_process_on_both_setups(tmp_path: Path) -> None:
    result = run_bench(
        "serve", "--tiny", "--concurrency", "1,2", "--requests", "10", "--coder-requests", "4",
        "--tokens", "2", "--rounds", "1", tmp_path=tmp_path,
    )  # fmt: skip
    rows = result["results"]
    assert isinstance(rows, list)
    assert [r["setup"] for r in rows] == ["zero-cost", "coder"]
    for row in rows:
        levels = [(level["endpoint"], level["concurrency"]) for level in row["levels"]]
        assert levels == [("completions", 1), ("completions", 2), ("chat", 1), ("chat", 2)]
        for level in row["levels"]:
            assert set(level["contenders"]) == {"in-process", "http", "http+openai"}
            assert set(level["versus_in_process"]) == {"http", "http+openai"}
    targets = result["targets"]
    assert isinstance(targets, list) and len(targets) == 4  # each setup and endpoint, 1 caller
    assert result["target_met"] == all(t["met"] for t in targets)


def test_unknown_suite_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "usage" in out.stdout


def test_policies_real_refuses_simulator_only_options(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "policies", "--real", "--plot", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--plot and --fleet are for the simulator" in out.stderr


def test_simreal_bench_compares_real_and_simulated_latency_per_kind(tmp_path: Path) -> None:
    result = run_bench(
        "simreal", "--tiny", "--requests", "40", "--duration", "1.5", "--rounds", "1",
        "--steps", "4", "--repeats", "2", tmp_path=tmp_path,
    )  # fmt: skip
    requests = result["requests"]
    assert result["tiny"] is True and isinstance(requests, int) and 20 <= requests <= 80
    assert result["tolerance"] == 0.15 and result["met"] in (True, False)
    by_kind = result["by_kind"]
    assert isinstance(by_kind, dict) and by_kind
    ranges = result["p95_real_range"]
    assert isinstance(ranges, dict) and set(ranges) == set(by_kind)
    for kind, gap in by_kind.items():
        assert gap["real"]["p50_s"] > 0 and gap["sim"]["p50_s"] > 0
        assert {"p50_error", "p95_error"} <= set(gap)
        # Both repeats pooled, and every request served in each.
        assert gap["real"]["served"] == gap["real"]["requests"] == gap["sim"]["requests"]
        low, high = ranges[kind]
        assert 0 < low <= high
    assert result["failed_real"] == 0 and result["token_mismatches"] == 0
    load = result["load_average"]
    assert isinstance(load, dict) and len(load["before_replay"]) == 3


def test_calibration_bench_compares_with_and_without_calibration(tmp_path: Path) -> None:
    result = run_bench(
        "calibration", "--seeds", "1", "--scale", "0.3", "--scenarios", "calm,slow",
        tmp_path=tmp_path,
    )  # fmt: skip
    summary = result["summary"]
    assert isinstance(summary, dict)
    assert set(summary) == {"calm", "slow", "bad_proposal"}
    runs = result["runs"]
    assert isinstance(runs, dict)
    for row in runs["calm"] + runs["slow"]:
        assert row["p95_on"] > 0 and row["p95_off"] > 0
    assert len(runs["slow"][0]["oracle_ratio_by_run"]) == 3
    # How far the uncalibrated run is from the oracle, which bounds what calibration can gain.
    assert runs["slow"][0]["p95_off_over_oracle"] > 0
    assert isinstance(summary["slow"]["target_reachable"], bool)
