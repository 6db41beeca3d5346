"""The feedback calibrator in the simulator: dynamic with and without calibration.

``python -m bench calibration [--seeds 10] [--interval 15] [--scale 1.0] [--json]``

``--json`` prints one JSON object (the summary and every run) instead of the lines.

Scenarios on the ladder fleet (virtual time, calibration every ``--interval`` seconds):

* ``calm``, ``steady``: the simulator's scenarios (no shift): calibration must not regress;
* ``slow``: calm, and the reasoner's service slows 3x halfway (another tenant on its device);
* ``mix``: code-heavy (coder 80%, reasoner 30%) then reasoning-heavy (coder 30%, reasoner 95%);
* ``cold``: steady, with the kernel seeded with wrong priors (the coder looks 4x slower and the
  reasoner 4x faster than they are, step slopes 0).

Per scenario and seed: p95 of dynamic with and without calibration (ratio < 1 is better), and
for the shifts the p95 of each of the first three calibration windows after the shift against
the oracle's in the same window. Finally a deliberately bad proposal (the calibrator's
``inject`` test hook) on ``steady``: whether the next run rolled it back. Targets (issue 11):
shifts p95 ratio <= 0.75; calm and steady <= 1.02; within 10% of the oracle within 3 runs after
a shift; the bad proposal rolled back within one window. Beside each shift, the p95 without
calibration over the oracle's (whole run): the 25% target is reachable only where that exceeds
1/0.75 (about 1.33); below it, calibration would have to beat the clairvoyant oracle.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np

from zeta._config import CalibrationSettings
from zeta._types import Kind
from zeta.sim import Interval, ladder_fleet, scenario
from zeta.sim._calibrate import FeedbackCalibrator, Slowdown, simulate_calibrated
from zeta.sim._scenarios import Phase, Scenario, _coder

SHIFTS = ("slow", "mix", "cold")
SCENARIO_NAMES = ("calm", "steady", *SHIFTS)


def _mix_phases(cap: Any, scale: float) -> list[Phase]:
    first = {**_coder(0.8), Kind.EMBED: 0.4, Kind.REASON: 0.3}
    second = {**_coder(0.3), Kind.EMBED: 0.4, Kind.REASON: 0.95}
    return [Phase(0.0, 120.0 * scale, first), Phase(120.0 * scale, 240.0 * scale, second)]


MIX = Scenario("mix", "code-heavy, then reasoning-heavy", _mix_phases)


def _p95(lat: np.ndarray[Any, Any]) -> float:
    lat = lat[np.isfinite(lat)]
    return float(np.quantile(lat, 0.95, method="inverted_cdf")) if lat.size else math.nan


def run_one(name: str, seed: int, interval: float, scale: float) -> dict[str, Any]:
    fleet = ladder_fleet()
    base = "calm" if name == "slow" else "steady" if name == "cold" else name
    if name == "mix":
        workload = MIX.build(fleet, seed, scale)
    else:
        workload = scenario(base, fleet, seed, scale=scale)
    end = workload[-1].at if workload else 0.0
    shift = end / 2.0 if name in ("slow", "mix") else 0.0
    slowdowns = [Slowdown(shift, "reasoner", 3.0)] if name == "slow" else []
    wrong = {}
    if name == "cold":
        wrong = {
            "coder": (0.002 + 0.0004 * 40 * 4, 0.0032 * 4, 0.0),
            "reasoner": ((0.002 + 0.00175 * 64) / 4, 0.014 / 4, 0.0),
        }
    settings = CalibrationSettings(interval_s=interval)
    out: dict[str, Any] = {"scenario": name, "seed": seed, "requests": len(workload)}
    results = {}
    for label, cal in (("off", None), ("on", FeedbackCalibrator(settings, fleet.specs,
                                                                   lanes=fleet.lanes, seed=seed))):  # fmt: skip
        t0 = time.perf_counter()
        r = simulate_calibrated(
            fleet, workload, calibrator=cal, interval=interval, slowdowns=slowdowns,
            wrong_priors=wrong, seed=seed,
        )  # fmt: skip
        results[label] = r
        out[f"p95_{label}"] = _p95(r.result.latency)
        out[f"wall_{label}_s"] = time.perf_counter() - t0
    on = results["on"]
    out["p95_ratio"] = out["p95_on"] / out["p95_off"]
    out["actions"] = [d.action for _, _, d in on.runs]
    out["final_params"] = on.runs[-1][1] if on.runs else {}
    if name in SHIFTS:
        oracle = simulate_calibrated(
            fleet, workload, "oracle", slowdowns=slowdowns, wrong_priors=wrong, seed=seed
        ).result
        start = math.ceil(shift / interval) * interval if shift > 0 else 0.0
        windows = []
        for k in range(3):
            a, b = start + k * interval, start + (k + 1) * interval
            mask_on = (on.result.at >= a) & (on.result.at < b)
            mask_or = (oracle.at >= a) & (oracle.at < b)
            windows.append(_p95(on.result.latency[mask_on]) / _p95(oracle.latency[mask_or]))
        out["oracle_ratio_by_run"] = windows
        # How far the uncalibrated run is from the best achievable: a 25% gain needs > 1/0.75.
        out["p95_off_over_oracle"] = out["p95_off"] / _p95(oracle.latency)
        out["within_10pct_of_oracle_by_run3"] = any(w <= 1.10 for w in windows)
    return out


def bad_proposal(seed: int, interval: float, scale: float) -> dict[str, Any]:
    """Inject a bad change at the third run of ``surge``; was it rolled back at the next?"""
    fleet = ladder_fleet()
    workload = scenario("surge", fleet, seed, scale=scale)
    settings = CalibrationSettings(interval_s=interval)
    cal = FeedbackCalibrator(settings, fleet.specs, lanes=fleet.lanes, seed=seed)
    bad = {"spill_penalty": 30.0, "quality_penalty": 10.0}

    original = cal.step
    calls = {"n": 0}

    def step(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            cal.inject(bad)
        return original(*args, **kwargs)

    cal.step = step  # type: ignore[method-assign]
    r = simulate_calibrated(fleet, workload, calibrator=cal, interval=interval, seed=seed)
    actions = [d.action for _, _, d in r.runs]
    injected = next((i for i, (_, _, d) in enumerate(r.runs) if d.detail.get("injected")), None)
    rolled = (
        injected is not None
        and injected + 1 < len(actions)
        and (actions[injected + 1] == "rolled_back")
    )
    restored = (
        rolled and injected is not None and r.runs[injected + 1][1] == r.runs[injected - 1][1]
        if injected and injected >= 1 else False
    )  # fmt: skip
    return {"seed": seed, "actions": actions, "injected_at_run": injected,
            "rolled_back_next_run": rolled, "restored_exact": restored}  # fmt: skip


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench calibration")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--interval", type=float, default=15.0, help="calibration interval, s")
    ap.add_argument("--scale", type=float, default=1.0, help="stretch of the scenarios")
    ap.add_argument("--scenarios", default=",".join(SCENARIO_NAMES))
    ap.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the lines"
    )
    args = ap.parse_args(argv)
    seeds = list(range(args.seed, args.seed + args.seeds))
    names = [n for n in args.scenarios.split(",") if n]
    rows: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    for name in names:
        rows[name] = [run_one(name, s, args.interval, args.scale) for s in seeds]
        ratios = [r["p95_ratio"] for r in rows[name]]
        iv = Interval.of(ratios)
        entry: dict[str, Any] = {"p95_ratio": iv.to_dict()}
        if name in SHIFTS:
            entry["target"] = "p95_ratio <= 0.75"
            entry["met"] = bool(iv.median <= 0.75)
            hits = [r["within_10pct_of_oracle_by_run3"] for r in rows[name]]
            entry["within_10pct_of_oracle_by_run3"] = f"{sum(hits)}/{len(hits)}"
            headroom = Interval.of([r["p95_off_over_oracle"] for r in rows[name]])
            entry["p95_off_over_oracle"] = headroom.to_dict()
            # Below 1/0.75 the target asks calibration to beat the clairvoyant oracle.
            entry["target_reachable"] = bool(headroom.median > 1.0 / 0.75)
        else:
            entry["target"] = "p95_ratio <= 1.02"
            entry["met"] = bool(iv.median <= 1.02)
        summary[name] = entry
        if not args.json:
            print(f"{name:7s} p95 on/off {iv:.3f}  target {entry['target']}: "
                  f"{'met' if entry['met'] else 'NOT met'}"
                  + (f"  oracle<=1.1x within 3 runs: {entry['within_10pct_of_oracle_by_run3']}"
                     f"  p95 off/oracle {headroom:.3f} (the target is reachable only above "
                     f"1.333: {'yes' if entry['target_reachable'] else 'no'})"
                     if name in SHIFTS else ""))  # fmt: skip
    bad = [bad_proposal(s, args.interval, args.scale) for s in seeds]
    rolled = sum(b["rolled_back_next_run"] for b in bad)
    summary["bad_proposal"] = {"rolled_back_within_one_window": f"{rolled}/{len(bad)}",
                               "restored_exact": f"{sum(b['restored_exact'] for b in bad)}/{len(bad)}"}  # fmt: skip
    if not args.json:
        print(f"bad proposal rolled back at the next run: {rolled}/{len(bad)}")
    if args.json:
        print(json.dumps({"seeds": seeds, "interval_s": args.interval, "scale": args.scale,
                          "summary": summary, "runs": rows, "bad_proposal": bad}, default=float))  # fmt: skip
    return 0
