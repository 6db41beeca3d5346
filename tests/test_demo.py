"""``zeta demo`` and the ``zeta`` command line: a short real run on the tiny models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zeta import Kind
from zeta.__main__ import main
from zeta._demo import DemoOptions, Job, Outcome, build_workload, run_demo, summarize

pytest.importorskip("llama_cpp")


def test_workload_is_deterministic_and_has_surges() -> None:
    a = build_workload(20.0, 0.0035, 0.014, seed=1)
    assert a == build_workload(20.0, 0.0035, 0.014, seed=1)
    assert a != build_workload(20.0, 0.0035, 0.014, seed=2)
    assert [j.at for j in a] == sorted(j.at for j in a)
    assert all(0.0 <= j.at < 20.0 for j in a)
    kinds = {j.kind for j in a}
    assert kinds == {Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON}
    # surges alternate: a burst of code on the coder, then one of planning on the reasoner
    surge = [j for j in a if j.surge]
    assert {j.kind for j in surge} == {Kind.CODE, Kind.REASON}
    assert surge[0].kind is Kind.CODE
    steady_code = [j for j in a if j.kind is Kind.CODE and not j.surge]
    assert sum(j.kind is Kind.CODE for j in surge) > len(steady_code) / 2
    assert all(0.0 < (j.difficulty or 0) < 1.0 for j in a if j.kind is Kind.REASON)
    assert all(j.texts and not j.prompt for j in a if j.kind is Kind.EMBED)


def test_slower_models_get_proportionally_fewer_requests() -> None:
    fast = build_workload(30.0, 0.002, 0.008, seed=0)
    slow = build_workload(30.0, 0.008, 0.032, seed=0)
    generated = (Kind.SIMPLE, Kind.CODE, Kind.REASON)
    n_fast = sum(j.kind in generated for j in fast)
    n_slow = sum(j.kind in generated for j in slow)
    assert 2.5 < n_fast / n_slow < 6


def test_summary_quantiles_and_spill_share() -> None:
    jobs = [Job(float(i), Kind.CODE, "p", max_tokens=4) for i in range(100)]
    outcomes = [
        Outcome(j, "ok", latency_s=(i + 1) / 100, model="coder" if i % 4 else "reasoner",
                tokens=4, spilled=i % 4 == 0)
        for i, j in enumerate(jobs)
    ]  # fmt: skip
    outcomes.append(Outcome(Job(0.0, Kind.REASON, "p", max_tokens=4), "rejected"))
    s = summarize(outcomes, elapsed_s=10.0)
    code = s["kinds"]["code"]
    assert (code["p50_s"], code["p95_s"], code["p99_s"]) == (0.5, 0.95, 0.99)
    assert math.isnan(s["kinds"]["reason"]["p50_s"]) and s["kinds"]["reason"]["requests"] == 1
    assert s["spilled_share"] == 0.25 and s["rejected"] == 1
    assert s["throughput_rps"] == 10.0 and s["throughput_tokens_per_s"] == 40.0
    assert s["models"]["reasoner"] == {"requests": 25, "tokens": 100, "spilled_in": 25}


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


def test_demo_runs_end_to_end_on_llama_cpp(tiny_models: dict[str, Path]) -> None:
    options = DemoOptions(
        duration_s=3.0, seed=3, live=False, directory=tiny_models["coder-tiny"].parent,
        tiny=True, print_report=False,
    )  # fmt: skip
    report = run_demo(options)
    _check_report(report)
    json.dumps(report, allow_nan=False)  # NaN became null


def test_cli_demo_json_is_the_last_line(tiny_models: dict[str, Path]) -> None:
    directory = str(tiny_models["coder-tiny"].parent)
    proc = subprocess.run(
        [sys.executable, "-m", "zeta", "demo", "--duration", "2", "--tiny", "--json",
         "--dir", directory],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    report = json.loads(last)
    _check_report(report)
    assert "p50 / p95 / p99" in proc.stdout  # the side-by-side table came first


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
