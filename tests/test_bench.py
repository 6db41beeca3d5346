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


def test_policies_bench_runs_every_workload_for_every_contender(tmp_path: Path) -> None:
    result = run_bench(
        "policies", "--duration", "2", "--policies", "static", "dynamic", tmp_path=tmp_path
    )
    workloads = result["workloads"]
    assert isinstance(workloads, dict)
    assert set(workloads) == {"steady", "bursty", "agent_fanout"}
    for w in workloads.values():
        assert set(w["policies"]) == {"static", "dynamic"}


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
