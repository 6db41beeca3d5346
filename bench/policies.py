"""A/B comparison of every shipped routing policy on seeded synthetic workloads.

    python -m bench policies [--seed S] [--duration D] [--scale X] [--json] [--plot DIR]
                             [--policies static dynamic dynamic:contention_weight=0 ...]

Three simulated models stand in for the llama ladder (``zeta.testing``'s embedder, coder and
reasoner roles: same kinds, preferences and quality ranks), with per-token service times about
4x apart: embedder 0.7 ms per prompt token, coder 3.5 ms and reasoner 13 ms per generated token
(prompt tokens at an eighth of that), 2 ms per call and 10% jitter. Three workloads from
:mod:`zeta.testing._workloads`, each generated once per seed and replayed identically against
a fresh scheduler per policy:

* ``steady``: a Poisson mix of chat, code, embedding and reasoning requests;
* ``bursty``: the same plus periodic high-priority surges of code requests (an edit storm);
* ``agent_fanout``: agents that plan (one reasoning request) then fan out code and embeddings.

Everything runs ``--scale`` times real time (service times, arrivals, and the scheduler's time
parameters: EWMA time constant, penalties, sampling interval), so a workload of ``--duration``
seconds takes about ``duration * scale`` seconds; figures are reported at full size (measured
times divided by the scale). Requests wait for mailbox room (``admission_timeout=None``), so the
comparison is in latency, not in refusals. A contender ``NAME:key=value,...`` runs policy
``NAME`` with scheduler parameters changed (:data:`PARAMS`), for ablations.

Prints, per workload and policy: p50/p95/p99 latency (all requests, and p99 per kind),
throughput, spilled share (served by a model that does not prefer the kind), failed requests,
then ratios to ``static``. ``--plot DIR`` writes PNG charts (needs matplotlib: ``pip install
'zeta[bench]'``); ``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from zeta import Kind, ModelSpec, Scheduler, Scoring, kernel_implementation
from zeta._ladder import ROLES
from zeta._policies import POLICIES, ThresholdPolicy
from zeta.testing._replay import ReplayResult, ReplaySummary, replay, summarize, warm_up
from zeta.testing._workloads import Arrival, agent_fanout, bursty, steady

#: Every shipped policy, in report order; ``static`` is the baseline the ratios divide by.
DEFAULT_POLICIES = ("static", "threshold", "dynamic", "round_robin", "jsq", "p2c", "peak_ewma")
BASELINE = "static"
#: Seconds per token at full size: (prompt token, generated token). The embedder's cost is all
#: prompt processing; the coder and the reasoner prefill at an eighth of their decode cost.
TOKEN_S: Mapping[str, tuple[float, float]] = {
    "embedder": (0.0007, 0.0),
    "coder": (0.0035 / 8, 0.0035),
    "reasoner": (0.013 / 8, 0.013),
}
BASE_S = 0.002
JITTER = 0.1
#: Scheduler parameters a contender may set, with the scheduler's defaults. All but
#: ``contention_weight`` are seconds at full size, scaled with the run.
PARAMS: Mapping[str, float] = {
    "tau": 5.0,
    "spill_penalty": 1.0,
    "quality_penalty": 0.25,
    "sample_interval": 0.5,
    "contention_weight": 1.0,
    "backlog_s": 2.0,  # threshold policy only
}
UNSCALED = frozenset({"contention_weight"})
KINDS = (Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON)


@dataclass(frozen=True, slots=True)
class Contender:
    """A policy and the scheduler parameters it runs with; ``label`` as given on the command line."""

    label: str
    policy: str
    params: Mapping[str, float]

    @classmethod
    def parse(cls, text: str) -> Contender:
        """``NAME`` or ``NAME:key=value,key=value``.

        Raises:
            ValueError: an unknown policy or parameter, or a value that is not a number >= 0.
        """
        name, _, rest = text.partition(":")
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
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
        return cls(text, name, params)


def ladder_specs(scale: float, seed: int) -> list[ModelSpec]:
    """The embedder, coder and reasoner as simulated models, at ``scale`` times real time."""
    specs = []
    for i, role in enumerate(("embedder", "coder", "reasoner")):
        kinds, preferred, quality = ROLES[role]
        prompt_s, token_s = TOKEN_S[role]
        options: dict[str, object] = {
            "base_s": BASE_S * scale,
            "per_prompt_token_s": prompt_s * scale,
            "per_output_token_s": token_s * scale,
            "jitter": JITTER,
            "seed": seed * 10 + i,
        }
        specs.append(
            ModelSpec(
                role,
                kinds=kinds,
                preferred=preferred,
                quality=quality,
                backend="simulated",
                options=options,
            )
        )
    return specs


def workloads(duration: float, seed: int) -> dict[str, list[Arrival]]:
    """The three workloads at full size (seconds), seeded.

    Average load stays below saturation (reasoner about 40-70% busy, coder 20-60%), so latency
    differences come from routing, not from an overload no policy can fix; the surges and
    fan-outs overload the coder for a few seconds at a time.
    """
    return {
        "steady": steady(duration, 2.5, seed=seed),
        "bursty": bursty(duration, 2.0, burst_rate=10.0, burst_every=5.0, burst_len=2.0, seed=seed),
        "agent_fanout": agent_fanout(duration, agents=2, fanout=6, think_s=3.0, seed=seed),
    }


async def run_one(
    contender: Contender, arrivals: Sequence[Arrival], scale: float, seed: int
) -> tuple[ReplayResult, dict[str, float]]:
    """Replay ``arrivals`` on a fresh scheduler; also return each model's busy share of the run."""
    p = {k: v if k in UNSCALED else v * scale for k, v in contender.params.items()}
    policy: str | ThresholdPolicy = contender.policy
    if policy == "threshold":
        policy = ThresholdPolicy(backlog_s=p["backlog_s"])
    async with Scheduler(
        ladder_specs(scale, seed),
        policy=policy,
        admission_timeout=None,
        seed=seed,
        scoring=Scoring(
            tau=p["tau"],
            contention_weight=p["contention_weight"],
            spill_penalty=p["spill_penalty"],
            quality_penalty=p["quality_penalty"],
        ),
        sample_interval=p["sample_interval"],
    ) as zs:
        await warm_up(zs, arrivals)
        busy0 = {m.name: m.busy_s for m in zs.snapshot().models}
        result = await replay(zs, arrivals, time_scale=scale)
        elapsed = result.elapsed_s
        busy = {
            m.name: (m.busy_s - busy0[m.name]) / elapsed if elapsed > 0 else 0.0
            for m in zs.snapshot().models
        }
    return result, busy


def full_size(result: ReplayResult, scale: float) -> ReplaySummary:
    """Summarise a run at ``scale`` as if it had run at full size (every time divided by it)."""

    def up(v: float | None) -> float | None:
        return None if v is None else v / scale

    records = [
        replace(
            r, latency_s=up(r.latency_s), queue_wait_s=up(r.queue_wait_s), service_s=up(r.service_s)
        )
        for r in result.records
    ]
    return summarize(records, result.elapsed_s / scale)


def _tighten_timer_slack() -> None:
    """Ask Linux for 1 us timer slack (default 50 us) for this thread and the threads it starts.

    The simulated backend sleeps once per generated token; at a tenth of real time a coder token
    is a 0.35 ms sleep, which the default slack would stretch by ~20%. Best effort: elsewhere
    the figures are just a little less exact.
    """
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK
        except (OSError, AttributeError):
            pass


# -- reporting ---------------------------------------------------------------------------------
def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v * 1e3:,.0f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else math.nan


def ratios_to_baseline(by_policy: Mapping[str, ReplaySummary]) -> dict[str, dict[str, float]]:
    """Per contender: its latency quantiles and throughput divided by the baseline's."""
    base = by_policy[BASELINE]
    out: dict[str, dict[str, float]] = {}
    for label, s in by_policy.items():
        r = {
            "p50": _ratio(s.latency.p50_s, base.latency.p50_s),
            "p95": _ratio(s.latency.p95_s, base.latency.p95_s),
            "p99": _ratio(s.latency.p99_s, base.latency.p99_s),
            "throughput": _ratio(s.throughput_rps, base.throughput_rps),
        }
        for k in KINDS:
            r[f"p99_{k.value}"] = _ratio(s.by_kind[k.value].p99_s, base.by_kind[k.value].p99_s)
        out[label] = r
    return out


def print_tables(
    summaries: Mapping[str, Mapping[str, ReplaySummary]],
    ratios: Mapping[str, Mapping[str, Mapping[str, float]]],
    out: Callable[[str], object] = print,
) -> None:
    """One table per workload: latency (ms, full size), throughput, spills, failures, ratios."""
    width = max(12, *(len(label) for by in summaries.values() for label in by))
    for workload, by_policy in summaries.items():
        n = next(iter(by_policy.values())).requests
        out(f"\n{workload}: {n} requests; latency in ms; 'x' columns are ratios to {BASELINE}")
        out(
            f"{'policy':{width}s} {'p50':>6s} {'p95':>6s} {'p99':>6s} "
            + "".join(f"{'p99 ' + k.value:>11s}" for k in KINDS)
            + f" {'req/s':>6s} {'spilled':>7s} {'failed':>6s} {'p50 x':>6s} {'p95 x':>6s} "
            f"{'p99 x':>6s}"
        )
        for label, s in by_policy.items():
            r = ratios[workload][label]
            out(
                f"{label:{width}s} {_ms(s.latency.p50_s):>6s} {_ms(s.latency.p95_s):>6s} "
                f"{_ms(s.latency.p99_s):>6s} "
                + "".join(f"{_ms(s.by_kind[k.value].p99_s):>11s}" for k in KINDS)
                + f" {s.throughput_rps:6.2f} {s.spilled_share:7.1%} {s.failed:6d} "
                f"{r['p50']:6.2f} {r['p95']:6.2f} {r['p99']:6.2f}"
            )


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


def plot(
    directory: Path,
    summaries: Mapping[str, Mapping[str, ReplaySummary]],
    runs: Mapping[str, Mapping[str, ReplayResult]],
    scale: float,
) -> list[Path]:
    """Write the charts into ``directory``; return their paths.

    ``policies_latency.png``: p50/p95/p99 per contender, one panel per workload.
    ``policies_timeline_<workload>.png``: each request's latency against its arrival time under
    static, threshold and dynamic, coloured by the model that served it.

    Raises:
        SystemExit: matplotlib is not installed.
    """
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    names = list(summaries)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.8), squeeze=False)
    for ax, workload in zip(axes[0], names, strict=True):
        by_policy = summaries[workload]
        labels = list(by_policy)
        bar = 0.27
        for j, q in enumerate(("p50", "p95", "p99")):
            values = [getattr(by_policy[p].latency, f"{q}_s") * 1e3 for p in labels]
            ax.bar([x + (j - 1) * bar for x in range(len(labels))], values, bar, label=q)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms")
        ax.set_title(f"{workload} ({by_policy[labels[0]].requests} requests)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("routing policies on simulated ladder models: latency of all requests")
    fig.tight_layout()
    path = directory / "policies_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    colours = {"embedder": "tab:green", "coder": "tab:blue", "reasoner": "tab:red"}
    for workload, results in runs.items():
        shown = [p for p in ("static", "threshold", "dynamic") if p in results]
        if not shown:
            continue
        fig, axes = plt.subplots(
            len(shown), 1, figsize=(11, 2.5 * len(shown)), sharex=True, sharey=True, squeeze=False
        )
        for ax, label in zip(axes[:, 0], shown, strict=True):
            for model, colour in colours.items():
                pts = [
                    (r.at, r.latency_s / scale * 1e3)
                    for r in results[label].records
                    if r.ok and r.model == model and r.latency_s is not None
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.scatter(xs, ys, s=8, c=colour, label=f"served by {model}")
            s = summaries[workload][label]
            ax.set_title(
                f"{label}: p50 {_ms(s.latency.p50_s)} / p95 {_ms(s.latency.p95_s)} / "
                f"p99 {_ms(s.latency.p99_s)} ms, spilled {s.spilled_share:.0%}",
                fontsize=10,
            )
            ax.set_yscale("log")
            ax.set_ylabel("latency, ms")
            ax.grid(which="both", alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize=8)
        axes[-1, 0].set_xlabel("scheduled arrival, s")
        fig.suptitle(f"{workload}: latency of each request by arrival time")
        fig.tight_layout()
        path = directory / f"policies_timeline_{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench policies", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds workloads, jitter and policies")
    parser.add_argument(
        "--duration", type=float, default=24.0, help="workload length, full-size seconds"
    )
    parser.add_argument(
        "--scale", type=float, default=0.06, help="time scale (0.1: ten times faster than real)"
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        metavar="NAME[:key=value,...]",
        help=f"contenders (default: every shipped policy); parameters: {', '.join(PARAMS)}",
    )
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts into DIR")
    args = parser.parse_args(argv)
    if not (args.duration > 0 and 0 < args.scale <= 1):
        parser.error("need --duration > 0 and 0 < --scale <= 1")
    try:
        contenders = [Contender.parse(text) for text in args.policies]
    except ValueError as exc:
        parser.error(str(exc))
    if BASELINE not in [c.label for c in contenders]:
        contenders.insert(0, Contender.parse(BASELINE))
    if len({c.label for c in contenders}) != len(contenders):
        parser.error("each contender may be named once")

    if args.plot is not None:
        _pyplot()  # fail before the runs, not after them
    _tighten_timer_slack()
    t0 = time.perf_counter()
    loads = workloads(args.duration, args.seed)
    runs: dict[str, dict[str, ReplayResult]] = {}
    busy: dict[str, dict[str, dict[str, float]]] = {}
    summaries: dict[str, dict[str, ReplaySummary]] = {}
    for workload, arrivals in loads.items():
        runs[workload], busy[workload], summaries[workload] = {}, {}, {}
        for c in contenders:
            run = partial(run_one, c, arrivals, args.scale, args.seed)
            result, shares = anyio.run(run, backend=args.backend)
            runs[workload][c.label] = result
            busy[workload][c.label] = shares
            summaries[workload][c.label] = full_size(result, args.scale)
    wall = time.perf_counter() - t0
    ratios = {w: ratios_to_baseline(by) for w, by in summaries.items()}

    print(
        f"routing policies on simulated ladder models: seed {args.seed}, {args.duration:g}s "
        f"workloads at {args.scale:g}x real time on {args.backend}, "
        f"kernel={kernel_implementation()}, python {platform.python_version()}"
    )
    print_tables(summaries, ratios)
    print("\nbusy share of embedder / coder / reasoner:")
    for workload, by_policy in busy.items():
        print(f"  {workload}")
        for label, shares in by_policy.items():
            print(f"    {label:24s} " + " / ".join(f"{v:4.0%}" for v in shares.values()))
    print(f"\nwall time {wall:.1f}s")
    written = []
    if args.plot is not None:
        written = plot(args.plot, summaries, runs, args.scale)
        for path in written:
            print(f"wrote {path}")
    if args.json:
        report = {
            "suite": "policies",
            "seed": args.seed,
            "duration_s": args.duration,
            "scale": args.scale,
            "backend": args.backend,
            "kernel": kernel_implementation(),
            "python": platform.python_version(),
            "wall_s": wall,
            "contenders": {c.label: {"policy": c.policy, **c.params} for c in contenders},
            "workloads": {
                w: {
                    "requests": len(loads[w]),
                    "policies": {label: s.to_dict() for label, s in by.items()},
                    "busy_share": busy[w],
                }
                for w, by in summaries.items()
            },
            "ratios_vs_static": _finite(ratios),
            "plots": [str(p) for p in written],
        }
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
