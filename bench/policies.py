"""A/B comparison of every routing policy: in the simulator by default, or replayed in real time.

    python -m bench policies [--seeds N] [--seed S] [--requests N] [--scenarios NAME ...]
                             [--fleet ladder|gpu|FILE.toml] [--priors] [--json] [--plot DIR]
                             [--policies static dynamic dynamic:contention_weight=0 ...]
    python -m bench policies --real [--tiny] [--slots N] [--scenarios calm surge] [--seed S]
                                    [--duration D] [--rounds R] [--priors] [--json] ...

**Simulator (default).** Every policy (``static``, ``threshold``, ``dynamic``, ``round_robin``,
``jsq``, ``p2c``, ``peak_ewma``) and the clairvoyant references run every scenario of
:data:`zeta.sim.SCENARIOS` (calm, steady, bursty, surge, overwhelm, fanout, heavy_tail, drift:
seeded, loads relative to the fleet's computed capacity) for ``--seeds`` seeds, in virtual time on
:func:`zeta.sim.simulate` with zeta's own router, kernel and policy objects. Each seed's workload
is generated once and replayed identically under every policy (the same jitter draws too).
Requests wait for mailbox room (``admission_timeout=None``), so the comparison is in latency,
not in refusals. The fleet is ``--fleet``: ``ladder`` (the generated CPU ladder: embedder, coder,
reasoner on one 2-core host), ``gpu`` (three models on one H100, with its measured contention) or
a profile file (:func:`zeta.sim.load_fleet`). The references (:class:`zeta.sim.OraclePolicy`)
know every request's true size and the device contention: ``oracle`` minimises latency alone over
every capable model (the ratios ``/oracle`` divide by it; per seed the better of the variants
with and without the co-load harm term, since neither dominates), ``oracle_pen`` adds the
kernel's spill and quality penalties as ``dynamic`` does.

Per scenario and policy it prints p50/p95/p99 and mean latency as the median over seeds with a
95% confidence interval (order statistics, :class:`zeta.sim.Interval`), the quality measure
(per request: 0 on a model preferred for its kind, else 1 plus the quality ranks lost), the
spilled share, refusals, and the median of the per-seed ratios to ``static`` and to the oracle;
for ``dynamic`` also its mean over ``oracle_pen``'s (``mean/pen``: against the reference that
pays the same penalties, read beside the quality measures). Then the issue's targets, each with
a pass/fail line (never tuned for: read them as measured), a flag for any policy that beats the
oracle on mean latency, and the simulator's speed (simulated requests per second of wall
time). A contender ``NAME:key=value,...`` runs ``NAME`` with parameters changed
(:data:`PARAMS`), for ablations.

**The real ladder (``--real``).** Validation on this host: the llama ladder (embedder, coder,
reasoner; ``--tiny`` the ``*-tiny`` rungs) is measured as ``zeta profile`` does, each scenario's
seeded trace (``--scenarios``, default calm and surge) is built for that measured fleet and
scaled to about ``--duration`` seconds at the scenario's own load, and replayed live, open loop,
on a fresh :class:`~zeta.Scheduler` per contender and round (:func:`zeta.sim._real.replay_real`;
rounds alternate the contenders' order). It prints p50/p95/p99 over all rounds, the per-round
ratios to ``static`` (median and range), the spilled share, and what the simulator predicts for
the same trace on the measured profile; then the issue's real-ladder targets. ``--priors`` seeds
the schedulers (and the simulator) with the measured profile. With the defaults (calm and
surge, 60 s, two rounds) it takes about eight minutes on two cores.

``--plot DIR`` writes PNG charts (needs matplotlib: ``pip install 'zeta[bench]'``); ``--json``
prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from zeta import ConfigError, ModelSpec, Scoring, kernel_implementation
from zeta._policies import POLICIES, Policy, ThresholdPolicy
from zeta.sim import (
    ORACLE,
    ORACLE_PEN,
    SCENARIOS,
    Capacity,
    Fleet,
    Interval,
    OraclePolicy,
    SimRequest,
    SimResult,
    SimSummary,
    gpu_fleet,
    ladder_fleet,
    load_fleet,
    scenario,
    simulate,
    surge_loads,
)
from zeta.sim._measure import measure_fleet
from zeta.sim._real import RealResult
from zeta.sim._stats import Latency

from .simreal import build_trace, run_real, specs_for

#: Every shipped policy, in report order; ``static`` is the baseline the ratios divide by.
DEFAULT_POLICIES = ("static", "threshold", "dynamic", "round_robin", "jsq", "p2c", "peak_ewma")
BASELINE = "static"
#: The baselines dynamic's p99 is held against.
RIVALS = ("jsq", "p2c", "peak_ewma", "threshold")
#: Parameters a contender may set, with the scheduler's defaults: every :class:`~zeta.Scoring`
#: field, the sampling interval and the threshold policy's ``backlog_s``.
PARAMS: Mapping[str, float] = {**Scoring().as_dict(), "sample_interval": 0.5, "backlog_s": 2.0}


@dataclass(frozen=True, slots=True)
class Contender:
    """A policy and the parameters it runs with; ``label`` as given on the command line."""

    label: str
    policy: str
    params: Mapping[str, float]

    @classmethod
    def parse(cls, text: str, *, oracle: bool = False) -> Contender:
        """``NAME`` or ``NAME:key=value,key=value`` (``oracle`` too, if allowed).

        Raises:
            ValueError: an unknown policy or parameter, or a value that is not a number >= 0.
        """
        name, _, rest = text.partition(":")
        if name not in POLICIES and not (oracle and name in (ORACLE, ORACLE_PEN)):
            known = sorted([*POLICIES, *([ORACLE, ORACLE_PEN] if oracle else [])])
            raise ValueError(f"unknown policy {name!r}; known: {known}")
        params = dict(PARAMS)
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if key not in PARAMS or not eq:
                raise ValueError(f"{text!r}: expected key=value with key in {sorted(PARAMS)}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{text!r}: {key} must be a number, got {value!r}") from None
            if not 0.0 <= number < math.inf:
                raise ValueError(f"{text!r}: {key} must be a finite number >= 0")
            params[key] = number
        contender = cls(text, name, params)
        try:
            contender.scoring()
        except ConfigError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return contender

    def scoring(self) -> Scoring:
        """The kernel's parameters."""
        fields = Scoring().as_dict()
        return Scoring().replace({k: v for k, v in self.params.items() if k in fields})


# == the simulator ================================================================================
FLEETS: Mapping[str, Callable[[], Fleet]] = {"ladder": ladder_fleet, "gpu": gpu_fleet}
#: Per-seed figures kept for every run.
FIGURES = ("p50", "p95", "p99", "mean")


def make_fleet(name: str) -> Fleet:
    """A shipped fleet by name, or one loaded from a profile file."""
    make = FLEETS.get(name)
    return make() if make is not None else load_fleet(name)


def sim_policy(contender: Contender) -> str | Policy:
    """What :func:`zeta.sim.simulate` takes for ``contender`` (a fresh object where it has
    parameters; names are made fresh, seeded, by the simulator)."""
    if contender.policy == "threshold":
        return ThresholdPolicy(backlog_s=contender.params["backlog_s"])
    return contender.policy


def run_contender(
    fleet: Fleet, work: Sequence[SimRequest], contender: Contender, seed: int, priors: bool
) -> SimResult:
    """One contender on one seed's workload. The ``oracle`` reference is the better, by mean
    latency, of :class:`~zeta.sim.OraclePolicy` with and without its co-load harm term (its
    wall and CPU time are those of both runs)."""

    def run(policy: str | Policy) -> SimResult:
        return simulate(
            fleet,
            work,
            policy,
            scoring=contender.scoring(),
            sample_interval=contender.params["sample_interval"],
            seed=seed,
            priors=priors,
        )

    if contender.policy != ORACLE:
        return run(sim_policy(contender))
    tries = [run(OraclePolicy(harm=harm)) for harm in (True, False)]
    best = min(tries, key=lambda r: r.summary().latency.mean_s)
    return replace(
        best,
        policy=ORACLE,
        wall_s=sum(r.wall_s for r in tries),
        cpu_s=sum(r.cpu_s for r in tries),
    )


@dataclass(frozen=True, slots=True)
class SeedRun:
    """One contender on one seed's workload: the figures the report aggregates."""

    seed: int
    p50: float
    p95: float
    p99: float
    mean: float
    quality: float
    spilled: float
    refused: int
    requests: int
    wall_s: float
    cpu_s: float

    @classmethod
    def of(cls, seed: int, result: SimResult) -> SeedRun:
        s: SimSummary = result.summary()
        lat = s.latency
        return cls(
            seed, lat.p50_s, lat.p95_s, lat.p99_s, lat.mean_s, s.quality, s.spilled_share,
            s.refused, s.requests, result.wall_s, result.cpu_s,
        )  # fmt: skip


def run_sims(
    fleet: Fleet,
    contenders: Sequence[Contender],
    names: Sequence[str],
    seeds: Sequence[int],
    requests: int | None,
    priors: bool,
    keep: Callable[[str, int], bool] = lambda name, seed: False,
    progress: Callable[[str], object] = lambda line: None,
) -> tuple[dict[str, dict[str, list[SeedRun]]], dict[tuple[str, int, str], SimResult]]:
    """Every contender on every scenario and seed: per scenario, per contender label, the runs
    in seed order; and the full results of the (scenario, seed) pairs ``keep`` asks for."""
    runs: dict[str, dict[str, list[SeedRun]]] = {}
    kept: dict[tuple[str, int, str], SimResult] = {}
    for name in names:
        runs[name] = {c.label: [] for c in contenders}
        for seed in seeds:
            work = scenario(name, fleet, seed, requests=requests)
            for c in contenders:
                result = run_contender(fleet, work, c, seed, priors)
                runs[name][c.label].append(SeedRun.of(seed, result))
                if keep(name, seed):
                    kept[name, seed, c.label] = result
        progress(f"  {name}: done")
    return runs, kept


def measure_speed(
    runs: Mapping[str, Mapping[str, Sequence[SeedRun]]], *labels: str
) -> dict[str, float]:
    """Simulated requests per second of wall and of CPU time, over every run of ``labels``."""
    done = [r for by in runs.values() for label in labels for r in by.get(label, ())]
    n = sum(r.requests for r in done)
    wall = sum(r.wall_s for r in done)
    cpu = sum(r.cpu_s for r in done)
    return {
        "requests": float(n),
        "wall": n / wall if wall > 0 else math.nan,
        "cpu": n / cpu if cpu > 0 else math.nan,
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else math.nan


def aggregate(
    runs: Mapping[str, Mapping[str, Sequence[SeedRun]]], oracle: str | None
) -> dict[str, dict[str, dict[str, Interval]]]:
    """Per scenario and contender: each figure over seeds, the quality measure, and the
    per-seed ratios of each figure to ``static`` (``<figure>/static``) and to the oracle
    (``<figure>/oracle``), as :class:`~zeta.sim.Interval` (median and 95% CI); for ``dynamic``
    also its p99 over each rival's (``p99/<rival>``)."""
    out: dict[str, dict[str, dict[str, Interval]]] = {}
    for name, by in runs.items():
        out[name] = {}
        others: dict[str, Sequence[SeedRun]] = {}
        if BASELINE in by:
            others[BASELINE] = by[BASELINE]
        if oracle is not None and oracle in by:
            others["oracle"] = by[oracle]
        for label, seeds in by.items():
            row: dict[str, Interval] = {}
            for fig in (*FIGURES, "quality", "spilled"):
                row[fig] = Interval.of([getattr(r, fig) for r in seeds])
            row["refused"] = Interval.of([float(r.refused) for r in seeds])
            pairs: list[tuple[str, Sequence[SeedRun], tuple[str, ...]]] = [
                (tag, other, FIGURES) for tag, other in others.items()
            ]
            if label == "dynamic":
                pairs += [(rival, by[rival], ("p99",)) for rival in RIVALS if rival in by]
                if ORACLE_PEN in by:  # the oracle under the same quality rules
                    pairs.append((ORACLE_PEN, by[ORACLE_PEN], ("mean",)))
            for tag, other, figures in pairs:
                for fig in figures:
                    row[f"{fig}/{tag}"] = Interval.of(
                        [
                            _ratio(getattr(r, fig), getattr(o, fig))
                            for r, o in zip(seeds, other, strict=True)
                        ]
                    )
            out[name][label] = row
    return out


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target's outcome: ``passed`` is None when it could not be checked."""

    target: str
    scenario: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"  {mark}  {self.target:<46s} {self.scenario:<11s} {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "passed": self.passed,
            "detail": self.detail,
        }


def check_targets(agg: Mapping[str, Mapping[str, Mapping[str, Interval]]]) -> list[Verdict]:
    """The issue's targets for ``dynamic``, on the medians of the per-seed ratios."""
    out: list[Verdict] = []

    def get(name: str, label: str, key: str) -> float:
        row = agg.get(name, {}).get(label)
        return row[key].median if row is not None and key in row else math.nan

    t = "surge: dynamic p99 <= 1/3 of static's"
    r = get("surge", "dynamic", "p99/static")
    out.append(
        Verdict(t, "surge", None if math.isnan(r) else r <= 1.0 / 3.0, f"p99/static {r:.3f}")
    )
    t = "calm: dynamic p50 within 3% of static's"
    r = get("calm", "dynamic", "p50/static")
    out.append(
        Verdict(
            t, "calm", None if math.isnan(r) else r <= 1.03,
            f"p50/static {r:.3f} (at most 1.03: no regression)",
        )
    )  # fmt: skip
    for name in agg:
        r = get(name, "dynamic", "mean/oracle")
        out.append(
            Verdict(
                "dynamic mean within 15% of the oracle's", name,
                None if math.isnan(r) else r <= 1.15, f"mean/oracle {r:.3f}",
            )
        )  # fmt: skip
    for name, by in agg.items():
        rivals = [b for b in RIVALS if b in by]
        if "dynamic" not in by or not rivals:
            out.append(Verdict("dynamic p99 <= best rival's, quality <=", name, None, "missing"))
            continue
        dyn = by["dynamic"]
        best = min(rivals, key=lambda b: by[b]["p99"].median)
        worst = max(rivals, key=lambda b: dyn[f"p99/{b}"].median)
        p99_ok = all(dyn[f"p99/{b}"].median <= 1.0 for b in rivals)
        q_ok = dyn["quality"].median <= by[best]["quality"].median
        out.append(
            Verdict(
                "dynamic p99 <= best rival's, quality <=", name, p99_ok and q_ok,
                f"p99/{worst} {dyn[f'p99/{worst}'].median:.3f}; best p99 {best} "
                f"{by[best]['p99'].median * 1e3:,.0f} ms at quality {by[best]['quality'].median:.3f}, "
                f"dynamic {dyn['p99'].median * 1e3:,.0f} ms at {dyn['quality'].median:.3f}",
            )
        )  # fmt: skip
    return out


def beats_oracle(agg: Mapping[str, Mapping[str, Mapping[str, Interval]]]) -> list[str]:
    """Lines naming every policy whose mean latency beats the oracle's (median per-seed ratio
    below 1), marked ``significant`` when the whole 95% interval is below 1: then the oracle is
    not one."""
    out = []
    for name, by in agg.items():
        for label, row in by.items():
            r = row.get("mean/oracle")
            if r is not None and r.median < 1.0 and label != ORACLE:
                mark = "significant" if r.high < 1.0 else "within noise"
                out.append(
                    f"  {name}: {label} mean/oracle {r:.3f} ({mark}); quality "
                    f"{row['quality'].median:.3f} vs the oracle's {by[ORACLE]['quality'].median:.3f}"
                )
    return out


def _ms_interval(iv: Interval) -> str:
    if not math.isfinite(iv.median):
        return "-"
    return f"{iv.median * 1e3:,.0f} [{iv.low * 1e3:,.0f}-{iv.high * 1e3:,.0f}]"


def print_sim_tables(
    agg: Mapping[str, Mapping[str, Mapping[str, Interval]]],
    runs: Mapping[str, Mapping[str, Sequence[SeedRun]]],
    out: Callable[[str], object] = print,
) -> None:
    width = max(9, *(len(label) for by in agg.values() for label in by))
    for name, by in agg.items():
        first = next(iter(runs[name].values()))
        n = round(sum(r.requests for r in first) / len(first))
        out(
            f"\n{name}: {SCENARIOS[name].description}; ~{n} requests x {len(first)} seeds. "
            "Latency in ms, median over seeds [95% CI]; ratios: median of per-seed ratios"
        )
        out(
            f"{'policy':{width}s} {'p50':>17s} {'p95':>19s} {'p99':>21s} {'mean':>17s} "
            f"{'quality':>7s} {'spill':>5s} {'refus':>5s} {'p50/st':>6s} {'p99/st':>6s} "
            f"{'mean/st':>7s} {'mean/or':>7s} {'p99/or':>6s}"
        )
        for label, row in by.items():

            def r(key: str, row: Mapping[str, Interval] = row) -> str:
                iv = row.get(key)
                return "-" if iv is None or not math.isfinite(iv.median) else f"{iv.median:.2f}"

            out(
                f"{label:{width}s} {_ms_interval(row['p50']):>17s} {_ms_interval(row['p95']):>19s} "
                f"{_ms_interval(row['p99']):>21s} {_ms_interval(row['mean']):>17s} "
                f"{row['quality'].median:7.3f} {row['spilled'].median:5.1%} "
                f"{row['refused'].median:5.0f} {r('p50/static'):>6s} {r('p99/static'):>6s} "
                f"{r('mean/static'):>7s} {r('mean/oracle'):>7s} {r('p99/oracle'):>6s}"
            )


def print_summary(
    agg: Mapping[str, Mapping[str, Mapping[str, Interval]]],
    out: Callable[[str], object] = print,
) -> None:
    """dynamic against static and the oracle, one line per scenario (medians of per-seed
    ratios), with the quality measures."""
    out(
        "\ndynamic vs static vs oracle (median of per-seed ratios; quality: dynamic / oracle / "
        "oracle_pen; mean/pen: dynamic's mean over oracle_pen's, the oracle that pays the same "
        "penalties)"
    )
    out(
        f"{'scenario':11s} {'p50/st':>6s} {'p95/st':>6s} {'p99/st':>6s} {'mean/st':>7s} "
        f"{'mean/or':>7s} {'p99/or':>6s} {'or p99/st':>9s} {'or mean/st':>10s} "
        f"{'mean/pen':>8s}  quality"
    )
    for name, by in agg.items():
        d, o = by.get("dynamic"), by.get(ORACLE)
        if d is None or o is None:
            continue
        pen = by.get(ORACLE_PEN)
        q = f"{d['quality'].median:.3f} / {o['quality'].median:.3f}"
        q += f" / {pen['quality'].median:.3f}" if pen is not None else ""
        vs_pen = d.get(f"mean/{ORACLE_PEN}")
        out(
            f"{name:11s} {d['p50/static'].median:6.2f} {d['p95/static'].median:6.2f} "
            f"{d['p99/static'].median:6.2f} {d['mean/static'].median:7.2f} "
            f"{d['mean/oracle'].median:7.2f} {d['p99/oracle'].median:6.2f} "
            f"{o['p99/static'].median:9.2f} {o['mean/static'].median:10.2f} "
            f"{vs_pen.median if vs_pen is not None else math.nan:8.2f}  {q}"
        )


def plot_sims(
    directory: Path,
    agg: Mapping[str, Mapping[str, Mapping[str, Interval]]],
    kept: Mapping[tuple[str, int, str], SimResult],
) -> list[Path]:
    """``policies_sim_latency.png``: p50/p95/p99 (median over seeds, 95% CI) per contender, one
    panel per scenario; ``policies_sim_timeline_<scenario>.png``: each request's latency against
    its arrival under static, dynamic and the oracle (first seed), coloured by model."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    names = list(agg)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        by = agg[name]
        labels = list(by)
        bar = 0.27
        for j, q in enumerate(("p50", "p95", "p99")):
            med = [by[p][q].median * 1e3 for p in labels]
            err = [
                [max(0.0, (by[p][q].median - by[p][q].low) * 1e3) for p in labels],
                [max(0.0, (by[p][q].high - by[p][q].median) * 1e3) for p in labels],
            ]
            ax.bar(
                [x + (j - 1) * bar for x in range(len(labels))],
                med,
                bar,
                yerr=err,
                label=q,
                capsize=2,
            )
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms")
        ax.set_title(name)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("routing policies in the simulator: latency, median over seeds with 95% CI")
    fig.tight_layout()
    path = directory / "policies_sim_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    colours = ["tab:green", "tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:brown"]
    for name in names:
        shown = [
            (lab, kept[key])
            for lab in ("static", "dynamic", ORACLE)
            for key in kept
            if key[0] == name and key[2] == lab
        ]
        if not shown:
            continue
        fig, axes = plt.subplots(
            len(shown), 1, figsize=(11, 2.4 * len(shown)), sharex=True, sharey=True, squeeze=False
        )
        for ax, (label, res) in zip(axes[:, 0], shown, strict=True):
            for m, model in enumerate(res.models):
                mask = res.model == m
                if mask.any():
                    ax.scatter(
                        res.at[mask],
                        res.latency[mask] * 1e3,
                        s=3,
                        c=colours[m % len(colours)],
                        label=f"served by {model}",
                    )
            s = res.summary()
            ax.set_title(
                f"{label}: p50 {s.latency.p50_s * 1e3:,.0f} / p99 {s.latency.p99_s * 1e3:,.0f} ms, "
                f"quality {s.quality:.3f}",
                fontsize=9,
            )
            ax.set_yscale("log")
            ax.set_ylabel("latency, ms")
            ax.grid(which="both", alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize=7, markerscale=3)
        axes[-1, 0].set_xlabel("arrival, s (virtual time)")
        fig.suptitle(f"{name}: latency of each request by arrival time (first seed)")
        fig.tight_layout()
        path = directory / f"policies_sim_timeline_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def sim_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        fleet = make_fleet(args.fleet)
    except (OSError, ValueError) as exc:
        parser.error(f"--fleet {args.fleet}: {exc}")
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")
    if args.seeds < 1 or (args.requests is not None and args.requests < 10):
        parser.error("need --seeds >= 1 and --requests >= 10")
    try:
        texts = list(args.policies or [*DEFAULT_POLICIES, ORACLE, ORACLE_PEN])
        contenders = [Contender.parse(text, oracle=True) for text in texts]
    except ValueError as exc:
        parser.error(str(exc))
    labels = [c.label for c in contenders]
    for must in (BASELINE, ORACLE):
        if must not in labels:
            contenders.insert(
                0 if must == BASELINE else len(contenders), Contender.parse(must, oracle=True)
            )
    if len({c.label for c in contenders}) != len(contenders):
        parser.error("each contender may be named once")
    if args.plot is not None:
        _pyplot()  # fail before the runs, not after them

    seeds = list(range(args.seed, args.seed + args.seeds))
    t0 = time.perf_counter()
    runs, kept = run_sims(
        fleet, contenders, names, seeds, args.requests, args.priors,
        keep=lambda name, seed: args.plot is not None and seed == seeds[0],
        progress=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    agg = aggregate(runs, ORACLE)
    speed = {c.label: measure_speed(runs, c.label) for c in contenders}
    policies_speed = measure_speed(runs, *(c.label for c in contenders if c.policy in POLICIES))
    cap = Capacity(fleet)
    surged = cap.surge_model()
    headroom = {
        "surged_model": surged,
        "surge": cap.headroom(surge_loads(fleet)),
        "surge_contended": cap.headroom(surge_loads(fleet), contended=True),
        "overwhelm": cap.headroom(surge_loads(fleet, 2.0, absorbable=False)),
    }
    verdicts = check_targets(agg)
    flagged = beats_oracle(agg)

    print(
        f"routing policies in the simulator: fleet {args.fleet} "
        f"({', '.join(m.name for m in fleet.models)}), seeds {seeds[0]}..{seeds[-1]}, "
        f"kernel={kernel_implementation()}, priors={'on' if args.priors else 'off'}, "
        f"python {platform.python_version()}"
    )
    print(f"scoring defaults (each contender's unless it sets them): {Scoring().as_dict()}")
    print(
        f"surge on the {surged}; headroom (others' spare over its excess): "
        f"{headroom['surge']:.2f} nominal, "
        f"{headroom['surge_contended']:.2f} with absorbing's own contention; "
        f"overwhelm {headroom['overwhelm']:.2f}"
    )
    print_sim_tables(agg, runs)
    print_summary(agg)
    print("\ntargets (dynamic; medians of per-seed ratios, 10 seeds in the issue):")
    for v in verdicts:
        print(v.line())
    print("\npolicies beating the oracle on mean latency (the oracle should be stronger):")
    for line in flagged or ["  none"]:
        print(line)
    print(
        f"\nsimulator speed, simulated requests per second over {policies_speed['requests']:,.0f} "
        f"requests under the shipped policies: {policies_speed['wall']:,.0f} of wall time, "
        f"{policies_speed['cpu']:,.0f} of CPU time; per contender (wall / CPU):"
    )
    for label, sp in speed.items():
        print(f"  {label:12s} {sp['wall']:9,.0f} / {sp['cpu']:9,.0f}")
    print(f"wall time {wall:.1f}s in all")
    written = plot_sims(args.plot, agg, kept) if args.plot is not None else []
    for path in written:
        print(f"wrote {path}")
    if args.json:
        report = {
            "suite": "policies",
            "mode": "sim",
            "fleet": args.fleet,
            "fleet_profile": fleet.to_dict(),
            "seeds": seeds,
            "requests": args.requests,
            "priors": args.priors,
            "kernel": kernel_implementation(),
            "scoring_defaults": Scoring().as_dict(),
            "python": platform.python_version(),
            "wall_s": wall,
            "speed": {"shipped_policies": policies_speed, "by_contender": speed},
            "headroom": headroom,
            "contenders": {c.label: {"policy": c.policy, **c.params} for c in contenders},
            "scenarios": {
                name: {
                    "description": SCENARIOS[name].description,
                    "requests": [r.requests for r in next(iter(runs[name].values()))],
                    "policies": {
                        label: {k: iv.to_dict() for k, iv in row.items()}
                        for label, row in by.items()
                    },
                    "per_seed": {
                        label: [
                            {
                                f: getattr(r, f)
                                for f in ("seed", *FIGURES, "quality", "spilled", "refused")
                            }
                            for r in rs
                        ]
                        for label, rs in runs[name].items()
                    },
                }
                for name, by in agg.items()
            },
            "targets": [v.to_dict() for v in verdicts],
            "beats_oracle": flagged,
            "plots": [str(p) for p in written],
        }
        print(json.dumps(_clean(report)))
    return 0


def _pyplot() -> Any:
    """``matplotlib.pyplot`` with a file-only backend, imported on first use.

    Raises:
        SystemExit: matplotlib is not installed (it is an optional dependency).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'zeta[bench]' (or pip install matplotlib)"
        ) from None
    return plt


# == the real ladder (--real) ======================================================================
#: Scenarios ``--real`` replays unless told others: the ones with real-ladder targets.
REAL_SCENARIOS = ("calm", "surge")
#: The issue's bound on dynamic's p99 in an absorbable surge, relative to static's.
SURGE_P99_BOUND = 1.0 / 3.0


@dataclass(frozen=True, slots=True)
class RealRun:
    """One contender's live replay of one scenario's trace, in one round."""

    scenario: str
    label: str
    round: int
    result: RealResult

    def latency(self) -> Latency:
        return Latency.of_served(self.result.latency)


def spilled_share(result: RealResult, specs: Sequence[ModelSpec]) -> float:
    """Share of the served requests that a model not preferring their kind served."""
    preferred = {s.name: s.preferred for s in specs}
    served = [(r.kind, r.model) for r in result.records if r.model is not None]
    if not served:
        return math.nan
    return sum(kind not in preferred[model] for kind, model in served) / len(served)


def real_verdicts(
    pooled: Mapping[str, Mapping[str, Latency]],
) -> list[tuple[bool | None, str, str, str]]:
    """The issue's real-ladder targets for ``dynamic``, on the latencies pooled over rounds:
    ``(passed, target, scenario, figure)``; ``passed`` is ``None`` when a side is missing."""
    out: list[tuple[bool | None, str, str, str]] = []
    for name, by in pooled.items():
        d, s = by.get("dynamic"), by.get(BASELINE)
        if d is None or s is None:
            continue
        p50, p99 = _ratio(d.p50_s, s.p50_s), _ratio(d.p99_s, s.p99_s)
        for q, r in (("p50", p50), ("p99", p99)):
            ok = r <= 1.0 if math.isfinite(r) else None
            out.append((ok, f"dynamic never worse than static on {q}", name, f"{q}/static {r:.2f}"))
        if name == "surge":
            ok = p99 <= SURGE_P99_BOUND if math.isfinite(p99) else None
            out.append((ok, "surge: dynamic p99 <= 1/3 of static's", name, f"p99/static {p99:.3f}"))
    return out


def real_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.plot is not None or args.fleet != "ladder":
        parser.error("--plot and --fleet are for the simulator; --real measures this host's ladder")
    names = args.scenarios or list(REAL_SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")
    if not (args.duration > 0 and args.rounds >= 1 and args.slots >= 1):
        parser.error("need --duration > 0, --rounds >= 1 and --slots >= 1")
    try:
        contenders = [Contender.parse(text) for text in args.policies or ("static", "dynamic")]
    except ValueError as exc:
        parser.error(str(exc))
    if BASELINE not in [c.label for c in contenders]:
        contenders.insert(0, Contender.parse(BASELINE))
    if len({c.label for c in contenders}) != len(contenders):
        parser.error("each contender may be named once")

    t0 = time.perf_counter()
    specs = specs_for(args.tiny, args.slots)
    fleet = measure_fleet(specs, report=print)
    priors = fleet.priors() if args.priors else None
    traces = {n: build_trace(fleet, n, args.seed, args.duration, args.requests)[0] for n in names}
    need = max(r.prompt_tokens + r.max_tokens for t in traces.values() for r in t) + 8
    if need > 512:  # a slot holds the prompt and max_tokens
        specs = specs_for(args.tiny, args.slots, n_ctx=need)
    print(
        f"routing policies on the real {'tiny ' if args.tiny else ''}llama ladder "
        f"({args.slots} slots), measured above: {', '.join(names)}, seed {args.seed}, "
        f"~{args.duration:g}s traces, {args.rounds} round(s) in alternating order, "
        f"priors={'on' if priors else 'off'}, kernel={kernel_implementation()}"
    )
    runs: list[RealRun] = []
    for name, trace in traces.items():
        for rnd in range(args.rounds):
            order = contenders if rnd % 2 == 0 else contenders[::-1]
            for c in order:
                # One scheduler holds llama.cpp threads at a time (``bench llama`` says why).
                run = partial(
                    run_real, specs, trace, sim_policy(c), args.seed,
                    scoring=c.scoring(), sample_interval=c.params["sample_interval"],
                    priors=priors,
                )  # fmt: skip
                runs.append(RealRun(name, c.label, rnd, anyio.run(run)))
                print(f"  {name} round {rnd + 1}: {c.label} done")
    wall = time.perf_counter() - t0

    pooled: dict[str, dict[str, Latency]] = {}
    report: dict[str, Any] = {}
    for name, trace in traces.items():
        pooled[name] = {}
        sims = {c.label: run_contender(fleet, trace, c, args.seed, args.priors) for c in contenders}
        print(
            f"\n{name}: {SCENARIOS[name].description}; {len(trace)} requests over "
            f"{trace[-1].at:.0f}s x {args.rounds} round(s). Latency in ms over all rounds; "
            "'/st': per-round ratio to static, median [min-max]; sim: the simulator on the "
            "measured profile"
        )
        print(
            f"{'policy':12s} {'p50':>6s} {'p95':>6s} {'p99':>6s} {'spill':>6s} {'failed':>6s} "
            f"{'p50/st':>17s} {'p99/st':>17s} {'sim p50':>8s} {'sim p99':>8s}"
        )
        mine = [r for r in runs if r.scenario == name]
        for c in contenders:
            own = [r for r in mine if r.label == c.label]
            lat = np.concatenate([r.result.latency for r in own])
            pooled[name][c.label] = p = Latency.of_served(lat)
            ratios: dict[str, list[float]] = {"p50": [], "p99": []}
            for r in own:
                base = next(b for b in mine if b.label == BASELINE and b.round == r.round)
                a, b = r.latency(), base.latency()
                ratios["p50"].append(_ratio(a.p50_s, b.p50_s))
                ratios["p99"].append(_ratio(a.p99_s, b.p99_s))
            spill = float(np.mean([spilled_share(r.result, specs) for r in own]))
            failed = sum(r.result.failed for r in own)
            sim = sims[c.label].summary().latency
            print(
                f"{c.label:12s} {_ms(p.p50_s):>6s} {_ms(p.p95_s):>6s} {_ms(p.p99_s):>6s} "
                f"{spill:6.1%} {failed:6d} {_spread(ratios['p50']):>17s} "
                f"{_spread(ratios['p99']):>17s} {_ms(sim.p50_s):>8s} {_ms(sim.p99_s):>8s}"
            )
            report.setdefault(name, {})[c.label] = {
                "latency": p.to_dict(),
                "per_round_ratio_to_static": ratios,
                "spilled_share": spill,
                "failed": failed,
                "sim": sim.to_dict(),
            }

    verdicts = real_verdicts(pooled)
    print("\ntargets (dynamic, latencies pooled over rounds):")
    for ok, target, name, figure in verdicts:
        mark = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        print(f"  {mark}  {target:42s} {name:8s} {figure}")
    print(
        f"\nwall time {wall:.0f}s; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    if args.json:
        out = {
            "suite": "policies",
            "mode": "real",
            "tiny": args.tiny,
            "slots": args.slots,
            "seed": args.seed,
            "rounds": args.rounds,
            "priors": bool(args.priors),
            "kernel": kernel_implementation(),
            "python": platform.python_version(),
            "wall_s": wall,
            "contenders": {c.label: {"policy": c.policy, **c.params} for c in contenders},
            "scenarios": {n: {"requests": len(t), **report[n]} for n, t in traces.items()},
            "targets": [
                {"target": t, "scenario": n, "figure": f, "passed": ok} for ok, t, n, f in verdicts
            ],
            "fleet": fleet.to_dict(),
        }
        print(json.dumps(_clean(out)))
    return 0


def _ms(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v * 1e3:,.0f}"


def _spread(values: Sequence[float]) -> str:
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return "-"
    return f"{float(np.median(ok)):.2f} [{min(ok):.2f}-{max(ok):.2f}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench policies", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--real", action="store_true", help="replay in real time through a Scheduler instead"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed (--real: the seed) of workloads, jitter, policies",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        metavar="NAME[:key=value,...]",
        help="contenders (default: every shipped policy, and the oracle in the simulator); "
        f"parameters: {', '.join(PARAMS)}",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts into DIR")
    sim = parser.add_argument_group("simulator")
    sim.add_argument("--seeds", type=int, default=10, help="seeds per scenario (default 10)")
    sim.add_argument(
        "--requests", type=int, metavar="N", help="about N requests per scenario (timeline scaled)"
    )
    sim.add_argument("--scenarios", nargs="+", metavar="NAME", help=f"of {', '.join(SCENARIOS)}")
    sim.add_argument(
        "--fleet", default="ladder", help="ladder, gpu, or a profile file (TOML); default ladder"
    )
    sim.add_argument(
        "--priors", action="store_true", help="seed the kernel's estimates from the profile"
    )
    real = parser.add_argument_group("--real")
    real.add_argument("--tiny", action="store_true", help="the *-tiny ladder models")
    real.add_argument("--slots", type=int, default=4, help="slots per model (default 4)")
    real.add_argument("--duration", type=float, default=60.0, help="trace length, s (default 60)")
    real.add_argument("--rounds", type=int, default=2, help="rounds per scenario (default 2)")
    args = parser.parse_args(argv)
    return real_main(args, parser) if args.real else sim_main(args, parser)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
