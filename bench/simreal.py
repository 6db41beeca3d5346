"""Sim-to-real check: one seeded trace on the real llama ladder and in the simulator.

    python -m bench simreal [--tiny] [--slots 4] [--scenario steady] [--duration 40]
                            [--requests N] [--policy dynamic] [--seed S] [--rounds 3]
                            [--steps 16] [--repeats 3] [--tolerance 0.15] [--json]

It measures the ladder models (embedder, coder, reasoner; ``--tiny`` the ``*-tiny`` ones) on
this host with :func:`zeta.sim._measure.measure_fleet` (what ``zeta profile`` does), builds the
scenario's seeded trace for that measured fleet scaled to about ``--duration`` seconds at the
scenario's own load (``--requests N``: the first ``N`` requests' worth of the scenario instead,
spread over ``--duration``, which lowers the load), with every request asking for exactly the
tokens it generates. It replays the trace in real time on a :class:`~zeta.Scheduler` over the
same models (:func:`zeta.sim._real.replay_real`) ``--repeats`` times, simulates it on the
measured fleet with the same policy and scoring as often (jitter seeds ``seed``, ``seed + 1``,
...), and prints p50 and p95 per kind over the pooled repeats, real and simulated, with the
simulator's relative error and the issue's target (within 15%). The live figures of one run
move a lot on a shared 2-core host (a kind's p95 by half between two identical runs), so the
range of the live p95 over the repeats is printed beside them. Both start with fresh
estimates and wait for mailbox room (``admission_timeout=None``). The host's load average is
printed beside the figures: other work on the machine shows in the real run only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np

from zeta import ModelSpec, Scheduler
from zeta._policies import Policy
from zeta.sim import SCENARIOS, Fleet, SimRequest, SimResult, scenario, simulate
from zeta.sim._measure import measure_fleet
from zeta.sim._real import (
    KindGap,
    RealRecord,
    RealResult,
    compare,
    exact_lengths,
    replay_real,
    stretched,
)
from zeta.testing import ladder_spec

ROLES = ("embedder", "coder", "reasoner")


def specs_for(tiny: bool, slots: int, n_ctx: int = 512) -> list[ModelSpec]:
    return [
        ladder_spec(f"{r}-tiny" if tiny else r, name=r, slots=slots, n_ctx=n_ctx) for r in ROLES
    ]


def build_trace(
    fleet: Fleet, name: str, seed: int, duration: float, requests: int | None
) -> tuple[list[SimRequest], float]:
    """The trace, and its load relative to the scenario's own (1 unless ``requests`` spread
    it)."""
    if requests is not None:
        trace = scenario(name, fleet, seed, requests=requests)
        end = max(r.at for r in trace)
        return exact_lengths(stretched(trace, duration)), end / duration
    span = SCENARIOS[name].targets(fleet)[-1][1]
    return exact_lengths(scenario(name, fleet, seed, scale=duration / span)), 1.0


async def run_real(
    specs: Sequence[ModelSpec],
    trace: Sequence[SimRequest],
    policy: str | Policy,
    seed: int,
    **options: Any,
) -> RealResult:
    """``trace`` replayed live on a fresh scheduler over ``specs``; ``options`` go to the
    :class:`~zeta.Scheduler` (``scoring``, ``priors``, ...). Requests wait for mailbox room."""
    async with Scheduler(
        list(specs), policy=policy, admission_timeout=None, seed=seed, **options
    ) as zs:
        return await replay_real(zs, trace)


def _ms(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v * 1e3:,.1f}"


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v * 100:+.0f}%"


def p95_ranges(runs: list[RealResult], sims: list[SimResult]) -> dict[str, tuple[float, float]]:
    """Per kind, the lowest and highest live p95 over the repeats."""
    per_run = [compare(run, sim) for run, sim in zip(runs, sims, strict=True)]
    return {
        kind: (min(g[kind].real.p95_s for g in per_run), max(g[kind].real.p95_s for g in per_run))
        for kind in per_run[0]
    }


class _PooledSim:
    """Simulations of the same trace as one :class:`~zeta.sim._real.Outcomes`."""

    def __init__(self, sims: list[SimResult]) -> None:
        self.kind = np.concatenate([s.kind for s in sims])
        self.latency = np.concatenate([s.latency for s in sims])


def pooled(runs: list[RealResult]) -> RealResult:
    """The repeats as one result (records in run order; kinds repeat the trace's)."""
    records: list[RealRecord] = [r for run in runs for r in run.records]
    return RealResult(tuple(records), sum(run.elapsed_s for run in runs))


def print_table(
    gaps: dict[str, KindGap], tolerance: float, ranges: dict[str, tuple[float, float]]
) -> None:
    print(
        f"{'kind':8s} {'n':>5s}  {'p50 real':>9s} {'p50 sim':>9s} {'err':>6s}  "
        f"{'p95 real':>9s} {'p95 sim':>9s} {'err':>6s}  {'p95 real, range':>17s}  "
        f"within {tolerance:.0%}"
    )
    for kind, g in gaps.items():
        lo, hi = ranges.get(kind, (math.nan, math.nan))
        print(
            f"{kind:8s} {g.real.requests:5d}  {_ms(g.real.p50_s):>9s} {_ms(g.sim.p50_s):>9s} "
            f"{_pct(g.p50_error):>6s}  {_ms(g.real.p95_s):>9s} {_ms(g.sim.p95_s):>9s} "
            f"{_pct(g.p95_error):>6s}  {_ms(lo):>8s}-{_ms(hi):<8s}  "
            f"{'yes' if g.within(tolerance) else 'no'}"
        )
    print("(latency in ms from scheduled arrival to answer, all repeats; err = sim / real - 1)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench simreal", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="the *-tiny ladder models")
    parser.add_argument("--slots", type=int, default=4, help="slots per model")
    parser.add_argument("--scenario", default="steady", choices=sorted(SCENARIOS))
    parser.add_argument("--duration", type=float, default=40.0, help="trace length, seconds")
    parser.add_argument("--requests", type=int, help="this many requests over --duration")
    parser.add_argument("--policy", default="dynamic", help="a shipped policy name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="profiling rounds")
    parser.add_argument("--steps", type=int, default=16, help="profiling decode steps")
    parser.add_argument("--repeats", type=int, default=3, help="live replays (and simulations)")
    parser.add_argument("--tolerance", type=float, default=0.15, help="target relative error")
    parser.add_argument("--json", action="store_true", help="print one JSON object, last")
    args = parser.parse_args(argv)
    if not (
        args.duration > 0
        and args.rounds >= 1
        and args.steps >= 1
        and args.slots >= 1
        and args.repeats >= 1
    ):
        parser.error("--duration, --rounds, --steps, --slots and --repeats must be positive")

    load: dict[str, Any] = {"before_measure": os.getloadavg()}
    specs = specs_for(args.tiny, args.slots)
    t0 = time.perf_counter()
    fleet = measure_fleet(specs, rounds=args.rounds, steps=args.steps, report=print)
    measure_s = time.perf_counter() - t0
    trace, relative = build_trace(fleet, args.scenario, args.seed, args.duration, args.requests)
    # A slot holds the prompt and max_tokens; long-tailed traces need more than the default.
    need = max((r.prompt_tokens + r.max_tokens for r in trace), default=0) + 8
    if need > 512:
        specs = specs_for(args.tiny, args.slots, n_ctx=need)
    print(
        f"sim-to-real: {args.scenario} (seed {args.seed}, load x{relative:.2g} of the "
        f"scenario's), {len(trace)} requests over {trace[-1].at:.1f}s, policy {args.policy}, "
        f"{'tiny ' if args.tiny else ''}ladder, {args.slots} slots"
    )
    load["before_replay"] = os.getloadavg()
    t0 = time.perf_counter()
    runs = [anyio.run(run_real, specs, trace, args.policy, args.seed) for _ in range(args.repeats)]
    replay_s = time.perf_counter() - t0
    load["after_replay"] = os.getloadavg()
    sims = [
        simulate(fleet, trace, args.policy, admission_timeout=None, seed=args.seed + k)
        for k in range(args.repeats)
    ]
    real = pooled(runs)
    ranges = p95_ranges(runs, sims)
    gaps = dict(compare(real, _PooledSim(sims)))

    print_table(gaps, args.tolerance, ranges)
    met = [k for k, g in gaps.items() if g.within(args.tolerance)]
    print(
        f"target: p50 and p95 per kind within {args.tolerance:.0%}: "
        f"{'met' if len(met) == len(gaps) else 'missed'} ({len(met)} of {len(gaps)} kinds)"
    )
    real_models = Counter(r.model for r in real.records if r.model is not None)
    sim_models: Counter[str] = Counter()
    for sim in sims:
        sim_models.update(sim.summary().by_model)
    refused = sum(sim.refused for sim in sims)
    print(
        "served by (real / sim): "
        + ", ".join(f"{m} {real_models.get(m, 0)}/{n}" for m, n in sim_models.items())
    )
    mismatched = sum(run.token_mismatches(trace) for run in runs)
    print(
        f"failed {real.failed} real / {refused} sim; token counts off the trace: {mismatched}; "
        f"load average (1/5/15 min) before the replay {_avg(load['before_replay'])}, "
        f"after {_avg(load['after_replay'])} on {os.cpu_count()} cores"
    )
    if args.json:
        report = {
            "scenario": args.scenario,
            "seed": args.seed,
            "policy": args.policy,
            "tiny": args.tiny,
            "slots": args.slots,
            "requests": len(trace),
            "duration_s": trace[-1].at,
            "relative_load": relative,
            "tolerance": args.tolerance,
            "met": len(met) == len(gaps),
            "by_kind": {k: g.to_dict() for k, g in gaps.items()},
            "served_by": {
                m.name: {"real": real_models.get(m.name, 0), "sim": sim_models[m.name]}
                for m in fleet.models
            },
            "failed_real": real.failed,
            "refused_sim": refused,
            "repeats": args.repeats,
            "p95_real_range": {k: list(v) for k, v in ranges.items()},
            "token_mismatches": mismatched,
            "fleet": fleet.to_dict(),
            "load_average": {k: list(v) for k, v in load.items()},
            "cores": os.cpu_count(),
            "measure_s": measure_s,
            "replay_s": replay_s,
        }
        print(json.dumps(_clean(report)))
    return 0


def _avg(v: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in v)


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
