"""``zeta demo``: a bursty agent workload on three real llama.cpp models, static vs dynamic.

The demo generates (or finds cached) the model ladder's embedder, coder and reasoner, measures
how fast this machine runs them, and derives one seeded, open-loop workload from that: a steady
mix of chat, code, embedding and reasoning requests, plus surges that queue several seconds of
work on one model: alternately a burst of code requests on the coder and a burst of planning
requests on the reasoner. The same workload is then replayed (:func:`zeta.testing.replay`)
against a fresh :class:`~zeta.Scheduler` per policy, in rounds that alternate the order (A B,
B A) so that a change in the machine's background load does not favour one policy. Under
``static`` each kind waits for its own model however long its queue; under ``dynamic`` the
scoring kernel moves work to the other model while that is expected to finish sooner. The report
(:func:`zeta.testing.summarize` of every round together) gives p50/p95/p99 latency per kind,
throughput and the share of requests served by a model that does not prefer their kind.

Arrival times are fixed in advance (open loop), so a slow policy cannot slow the arrivals down
and hide its own queueing; latency runs from a request's scheduled arrival to its answer.

``zeta demo --metrics-port PORT`` serves Prometheus metrics while it runs, through a
:class:`DemoMetrics` that follows the scheduler of the moment.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from .. import _ladder
from .._snapshot import SchedulerSnapshot
from .._types import SERVED_KINDS, Kind, ModelSpec, Scoring
from ..backends import CompletionParams, get_backend
from ..telemetry._recorder import Outcome, Recorder
from ..testing._replay import (
    ReplayResult,
    ReplaySummary,
    RequestRecord,
    replay,
    submit_arrival,
    summarize,
    warm_up,
)
from ..testing._workloads import Arrival

if TYPE_CHECKING:
    from .._request import CompletionResult, EmbeddingResult
    from .._scheduler import Scheduler

__all__ = [
    "DemoArrival", "DemoMetrics", "DemoOptions", "build_workload", "policy_report", "run_demo",
]  # fmt: skip

# Workload shape, in shares of one model's time (utilisation) and tokens per request. Steady
# traffic keeps the coder 20% and the reasoner 15% busy. Every SURGE_PERIOD_S a surge
# arrives, alternately a burst of code requests worth CODE_SURGE_S of coder time (a fleet of
# agents hitting the edit step at once) and a burst of planning requests worth REASON_SURGE_S
# of reasoner time. Each overloads one model for a few seconds while the other has room. On two
# cores (three model threads) that leaves headroom to move work without oversubscribing the
# CPU, so what the comparison shows is routing, not thrashing.
SIMPLE_TOKENS, CODE_TOKENS, REASON_TOKENS = 24, 48, 48
EMBED_TEXTS = 4
CODER_SIMPLE_UTIL, CODER_CODE_UTIL, REASONER_UTIL = 0.08, 0.12, 0.15
EMBED_RATE_PER_S = 1.5
CODE_SURGE_S, REASON_SURGE_S = 2.5, 3.0
SURGE_PERIOD_S = 6.0
SURGE_SPREAD_S = 0.4

# Caps that only bind on very fast models (the tiny test rungs), keeping a run light there.
MAX_RATE_PER_S, MAX_SURGE = 20.0, 40

_WORDS = (
    "the model request value data function return class import async await list dict "
    "because therefore first then answer question reason think step result self config "
    "token prompt output input index count format split sort filter reduce sum max min"
).split()

#: Outcomes the report counts as "rejected" (a :class:`~zeta.TryAgainError`: try again later);
#: ``cancelled`` (still running when the round's time ran out) counts as "unfinished", the rest
#: as errors.
_REJECTED = frozenset(
    {Outcome.OVERLOADED, Outcome.DEADLINE, Outcome.ACTOR_DEAD, Outcome.UNAVAILABLE}
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``zeta demo`` runs.

    Args:
        duration_s: wall time of the whole workload, split evenly between the policies and
            the rounds.
        seed: seeds the workload (and nothing else: the models are the ladder's seed 0).
        policies: policies to compare, each on a fresh scheduler and the same workload.
        live: show the live progress display (only on a terminal).
        directory: model cache directory (default: the user cache).
        tiny: use the ``*-tiny`` models (tests: fast, but the latency contrast is small).
        n_threads: llama.cpp threads per model.
        rounds: rounds to split the time into; the policies run in turn each round, in
            alternating order (A B, B A, ...), each round on a fresh workload and schedulers.
        print_report: print the tables at the end.
        scoring: the scoring kernel's parameters for every :class:`~zeta.Scheduler`, the same
            for all policies (default the library's, so the demo shows what users get).
    """

    duration_s: float = 40.0
    seed: int = 0
    policies: tuple[str, ...] = ("static", "dynamic")
    live: bool = True
    directory: str | os.PathLike[str] | None = None
    tiny: bool = False
    n_threads: int = 1
    rounds: int = 2
    print_report: bool = True
    scoring: Scoring = field(default_factory=Scoring)


@dataclass(frozen=True, slots=True)
class DemoArrival(Arrival):
    """An arrival of the demo's workload: an :class:`Arrival` that may carry a batch of texts to
    embed (then ``prompt`` is empty) or a completion's difficulty, and whether it is part of a
    surge."""

    texts: tuple[str, ...] = ()
    difficulty: float | None = None
    surge: bool = False


async def _submit(
    scheduler: Scheduler, arrival: Arrival, /, **options: Any
) -> CompletionResult | EmbeddingResult:
    """Sends a :class:`DemoArrival` with its texts or difficulty (the replay's ``submit``)."""
    if not isinstance(arrival, DemoArrival):
        return await submit_arrival(scheduler, arrival, **options)
    if arrival.kind is Kind.EMBED:
        return await scheduler.embed(list(arrival.texts), priority=arrival.priority, **options)
    return await scheduler.complete(
        arrival.prompt,
        kind=arrival.kind,
        max_tokens=arrival.max_tokens,
        priority=arrival.priority,
        difficulty=arrival.difficulty,
        **options,
    )


class DemoMetrics:
    """The metrics source of a whole demo (pass it to :func:`~zeta.telemetry.serve_metrics`).

    The demo runs a fresh :class:`~zeta.Scheduler` per policy and round, one after another. All of
    them count into this one :attr:`recorder`, so counters only grow over the demo (every policy
    together, as one deployment would); actor gauges come from the scheduler that is running, and
    are absent between runs.
    """

    def __init__(self) -> None:
        self.recorder = Recorder()
        #: The scheduler running now, if any (set and cleared by :func:`run_demo`).
        self.scheduler: Scheduler | None = None

    def snapshot(self) -> SchedulerSnapshot:
        """The running scheduler's actors, or none (callable from the metrics server's thread)."""
        zs = self.scheduler
        if zs is None:
            return SchedulerSnapshot(at=time.monotonic(), models=())
        return zs.snapshot()


@dataclass(slots=True)
class _Live:
    """State the live display reads while a run is going."""

    policy: str = ""
    started: float = 0.0
    duration_s: float = 0.0
    done: Counter[str] = field(default_factory=Counter)
    snapshot: SchedulerSnapshot | None = None


def _status(outcome: Outcome) -> str:
    """The report's word for an outcome: ``ok``, ``rejected``, ``unfinished`` or ``error``."""
    if outcome is Outcome.OK:
        return "ok"
    if outcome in _REJECTED:
        return "rejected"
    return "unfinished" if outcome is Outcome.CANCELLED else "error"


# --------------------------------------------------------------------------------------------
# Models and calibration.


def demo_models(options: DemoOptions) -> list[ModelSpec]:
    """The three role models as :class:`ModelSpec`, generating files that are not cached."""
    suffix = "-tiny" if options.tiny else ""
    return [
        _ladder.ladder_spec(
            f"{role}{suffix}",
            name=role,
            directory=options.directory,
            n_threads=options.n_threads,
            n_ctx=512 if role == "embedder" else 1024,
        )
        for role in ("embedder", "coder", "reasoner")
    ]


def measure_token_times(specs: Sequence[ModelSpec], tokens: int = 32) -> dict[str, float]:
    """Seconds per generated token of each model on this machine, all running at once.

    The models run side by side during the demo, sharing cores and memory bandwidth, so they are
    timed side by side too: each in its own thread, best of three completions.
    """
    backends = [
        get_backend(s.backend)(ModelSpec(s.name, path=s.path, n_ctx=256, n_threads=s.n_threads), 0)
        for s in specs
    ]
    times: dict[str, float] = {}

    def measure(backend: Any) -> None:
        best = math.inf
        for i in range(3):
            c = backend.complete(CompletionParams(f"calibration run {i}", max_tokens=tokens))
            best = min(best, (c.service_s - c.first_token_s) / max(c.completion_tokens - 1, 1))
        times[backend.spec.name] = best

    try:
        threads = [threading.Thread(target=measure, args=(b,)) for b in backends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for b in backends:
            b.close()
    return times


# --------------------------------------------------------------------------------------------
# The workload.


def _text(rng: random.Random, n_words: int, lead: str = "") -> str:
    return lead + " ".join(rng.choice(_WORDS) for _ in range(n_words))


def build_workload(
    duration_s: float, coder_token_s: float, reasoner_token_s: float, seed: int
) -> list[DemoArrival]:
    """The open-loop arrivals of one run, sized to this machine's measured token times.

    Steady Poisson arrivals per kind at the utilisations above, plus a surge every
    :data:`SURGE_PERIOD_S` from 15% to 80% of the run, alternately code (worth
    :data:`CODE_SURGE_S` of coder time) and reasoning (:data:`REASON_SURGE_S` of reasoner
    time). Sorted by time; deterministic for its arguments.
    """
    rng = random.Random(seed)
    arrivals: list[DemoArrival] = []
    system = "You are a coding agent. Use the tools. "

    def poisson(rate: float, make: Callable[[float], DemoArrival]) -> None:
        rate = min(rate, MAX_RATE_PER_S)
        t = rng.expovariate(rate) if rate > 0 else math.inf
        while t < duration_s:
            arrivals.append(make(t))
            t += rng.expovariate(rate)

    simple_rate = CODER_SIMPLE_UTIL / (SIMPLE_TOKENS * coder_token_s)
    code_rate = CODER_CODE_UTIL / (CODE_TOKENS * coder_token_s)
    reason_rate = REASONER_UTIL / (REASON_TOKENS * reasoner_token_s)
    poisson(
        simple_rate,
        lambda t: DemoArrival(t, Kind.SIMPLE, _text(rng, 8, "hi, "), SIMPLE_TOKENS),
    )
    poisson(
        code_rate,
        lambda t: DemoArrival(t, Kind.CODE, _text(rng, 24, system + "def "), CODE_TOKENS),
    )
    poisson(
        reason_rate,
        lambda t: DemoArrival(
            t,
            Kind.REASON,
            _text(rng, 24, "think step by step: "),
            REASON_TOKENS,
            difficulty=rng.uniform(0.3, 0.9),
        ),
    )
    poisson(
        EMBED_RATE_PER_S,
        lambda t: DemoArrival(
            t, Kind.EMBED, "", 0, texts=tuple(_text(rng, 12) for _ in range(EMBED_TEXTS))
        ),
    )
    surges = (
        (Kind.CODE, CODE_SURGE_S / (CODE_TOKENS * coder_token_s), "fix this: def ", CODE_TOKENS),
        (Kind.REASON, REASON_SURGE_S / (REASON_TOKENS * reasoner_token_s), "plan: ", REASON_TOKENS),
    )
    start, n = duration_s * 0.15, 0
    while start < duration_s * 0.8:
        kind, size, lead, tokens = surges[n % 2]
        for _ in range(min(MAX_SURGE, max(2, round(size)))):
            at = start + rng.uniform(0.0, SURGE_SPREAD_S)
            # Planning steps in a burst are short hops: easier than standalone reasoning.
            difficulty = rng.uniform(0.1, 0.5) if kind is Kind.REASON else None
            prompt = _text(rng, 24, system + lead)
            arrivals.append(
                DemoArrival(at, kind, prompt, tokens, surge=True, difficulty=difficulty)
            )
        start += SURGE_PERIOD_S
        n += 1
    arrivals.sort(key=lambda a: a.at)
    return arrivals


# --------------------------------------------------------------------------------------------
# Running one policy.


async def _run_policy(
    policy: str,
    specs: Sequence[ModelSpec],
    arrivals: Sequence[DemoArrival],
    duration_s: float,
    live: _Live,
    grace_s: float,
    scoring: Scoring,
    metrics: DemoMetrics | None = None,
) -> tuple[ReplayResult, dict[str, float]]:
    """Replay ``arrivals`` on a fresh scheduler; also return each model's busy seconds."""
    from .._scheduler import Scheduler

    # Requests wait for mailbox room rather than being refused: the comparison is in latency.
    async with Scheduler(
        list(specs),
        policy=policy,
        scoring=scoring,
        admission_timeout=None,
        recorder=None if metrics is None else metrics.recorder,
    ) as zs:
        if metrics is not None:
            metrics.scheduler = zs
        try:
            # Page in the weights and prime the estimates; not measured.
            await warm_up(zs, arrivals, submit=_submit)
            busy0 = {m.name: m.busy_s for m in zs.snapshot().models}
            live.duration_s, live.done = duration_s, Counter()
            live.started = time.monotonic()

            async def watch() -> None:
                while True:
                    live.snapshot = zs.snapshot()
                    await anyio.sleep(0.2)

            def count(record: RequestRecord) -> None:
                live.done[_status(record.outcome)] += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                result = await replay(
                    zs,
                    arrivals,
                    timeout_s=duration_s + grace_s,
                    on_record=count,
                    submit=_submit,
                )
                tg.cancel_scope.cancel()
            busy = {m.name: m.busy_s - busy0.get(m.name, 0.0) for m in zs.snapshot().models}
        finally:
            if metrics is not None:
                metrics.scheduler = None
    return result, busy


# --------------------------------------------------------------------------------------------
# Summaries.


def policy_report(summary: ReplaySummary, busy_s: Mapping[str, float]) -> dict[str, Any]:
    """One policy's part of the report (JSON-ready): ``summary`` of its rounds together, and
    ``busy_s``, each model's seconds of work in them.

    Per kind the request count and p50/p95/p99 latency (``None`` where none succeeded);
    throughput; spilled share; rejected (try again later), failed and unfinished requests; per
    model the requests, tokens and spilled-in requests it served and its busy share.
    """
    d = summary.to_dict()
    statuses: Counter[str] = Counter()
    for outcome, n in summary.outcomes.items():
        statuses[_status(Outcome(outcome))] += n
    elapsed = summary.elapsed_s
    return {
        "elapsed_s": d["elapsed_s"],
        "kinds": {
            kind: {key: stats[key] for key in ("requests", "ok", "p50_s", "p95_s", "p99_s")}
            for kind, stats in d["by_kind"].items()
        },
        "throughput_rps": d["throughput_rps"],
        "throughput_tokens_per_s": d["tokens_per_s"],
        "spilled_share": d["spilled_share"],
        "rejected": statuses["rejected"],
        "errors": statuses["error"],
        "unfinished": statuses["unfinished"],
        "models": {
            name: {"requests": m["requests"], "tokens": m["tokens"], "spilled_in": m["spilled"]}
            for name, m in d["by_model"].items()
        },
        "model_busy": {
            name: {"busy_share": b / elapsed if elapsed > 0 else 0.0} for name, b in busy_s.items()
        },
    }


# --------------------------------------------------------------------------------------------
# Display.


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:,.0f}"


def _live_view(live: _Live) -> Any:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    head = Table.grid(padding=(0, 1))
    if not live.started:
        head.add_row(f"[bold]{live.policy}[/]", "loading models and warming up...")
        return head
    elapsed = time.monotonic() - live.started
    head.add_row(
        f"[bold]{live.policy}[/]",
        ProgressBar(total=live.duration_s, completed=min(elapsed, live.duration_s), width=40),
        f"{elapsed:5.1f}/{live.duration_s:.0f}s",
        f"ok {live.done['ok']}  rejected {live.done['rejected']}  errors {live.done['error']}",
    )
    models = Table("model", "state", "queue", "in flight", "util", "done", box=None)
    if live.snapshot is not None:
        for m in live.snapshot.models:
            models.add_row(
                m.name if m.replica == 0 else f"{m.name}#{m.replica}",
                str(m.state),
                f"{m.queue_len:3d} " + "█" * min(m.queue_len, 30),
                str(m.in_flight),
                f"{m.utilisation:4.0%}",
                str(m.completed),
            )
    return Group(head, models)


def print_report(report: dict[str, Any], console: Any) -> None:
    """The per-model table and the side-by-side of the policies."""
    from rich.table import Table

    policies = list(report["policies"])
    per_model = Table(title="per model", title_justify="left")
    for col in ("policy", "model", "requests", "tokens", "spilled in", "busy"):
        per_model.add_column(col, justify="left" if col in ("policy", "model") else "right")
    for policy in policies:
        run = report["policies"][policy]
        for name in sorted(set(run["models"]) | set(run["model_busy"])):
            m = run["models"].get(name, {"requests": 0, "tokens": 0, "spilled_in": 0})
            busy = run["model_busy"].get(name, {}).get("busy_share")
            per_model.add_row(
                policy, name, str(m["requests"]), f"{m['tokens']:,}", str(m["spilled_in"]),
                "-" if busy is None else f"{busy:.0%}",
            )  # fmt: skip
    console.print(per_model)

    side = Table(title="latency (ms) and throughput, same workload", title_justify="left")
    side.add_column("kind")
    side.add_column("n", justify="right")
    for policy in policies:
        side.add_column(f"{policy}\np50 / p95 / p99", justify="right")
    for kind in SERVED_KINDS:
        cells = []
        for policy in policies:
            k = report["policies"][policy]["kinds"][kind.value]
            cells.append(f"{_ms(k['p50_s'])} / {_ms(k['p95_s'])} / {_ms(k['p99_s'])}")
        n = report["policies"][policies[0]]["kinds"][kind.value]["requests"]
        side.add_row(kind.value, str(n), *cells)
    side.add_section()
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("requests/s", lambda r: f"{r['throughput_rps']:.2f}"),
        ("tokens/s", lambda r: f"{r['throughput_tokens_per_s']:.0f}"),
        ("spilled share", lambda r: f"{r['spilled_share']:.1%}"),
        ("rejected / failed / left",
         lambda r: f"{r['rejected']} / {r['errors']} / {r['unfinished']}"),
    ]  # fmt: skip
    for label, fmt in rows:
        side.add_row(label, "", *(fmt(report["policies"][p]) for p in policies))
    console.print(side)


# --------------------------------------------------------------------------------------------
# Entry point.


def run_demo(options: DemoOptions, *, metrics: DemoMetrics | None = None) -> dict[str, Any]:
    """Run the demo and return its report (what ``--json`` prints: no NaN, JSON-ready).

    Args:
        options: what to run.
        metrics: counts every scheduler's requests and follows the running one (for a metrics
            endpoint the caller serves).
    """
    from rich.console import Console

    console = Console()
    if not options.policies or options.duration_s <= 0:
        raise ValueError("the demo needs at least one policy and a positive duration")
    with console.status("preparing models (generated on first run)..."):
        specs = demo_models(options)
        by_name = {s.name: s for s in specs}
        measured = measure_token_times([by_name["coder"], by_name["reasoner"]])
        coder_s, reasoner_s = measured["coder"], measured["reasoner"]
    rounds = max(1, options.rounds)
    segment_s = options.duration_s / (len(options.policies) * rounds)
    workloads = [
        build_workload(segment_s, coder_s, reasoner_s, options.seed + r) for r in range(rounds)
    ]
    n_arrivals = sum(len(w) for w in workloads)
    n_surge = sum(a.surge for w in workloads for a in w)
    grace_s = max(5.0, segment_s)
    console.print(
        f"zeta demo: {n_arrivals} requests ({n_surge} in surges) per policy, in {rounds} rounds "
        f"of {segment_s:.0f}s\nmeasured side by side: coder {coder_s * 1e3:.1f} ms/token, "
        f"reasoner {reasoner_s * 1e3:.1f} ms/token"
    )
    records: dict[str, list[RequestRecord]] = {p: [] for p in options.policies}
    elapsed: dict[str, float] = dict.fromkeys(options.policies, 0.0)
    busy: dict[str, defaultdict[str, float]] = {p: defaultdict(float) for p in options.policies}
    for r, arrivals in enumerate(workloads):
        # A B, then B A: drift in the machine's background load hits every policy alike.
        order = options.policies if r % 2 == 0 else options.policies[::-1]
        for policy in order:
            live = _Live(policy=f"{policy} (round {r + 1}/{rounds})")
            result, busy_s = _play(
                policy, specs, arrivals, segment_s, live, grace_s, options, console, metrics
            )
            records[policy].extend(result.records)
            elapsed[policy] += result.elapsed_s
            for name, seconds in busy_s.items():
                busy[policy][name] += seconds
    report: dict[str, Any] = {
        "duration_s": options.duration_s,
        "seed": options.seed,
        "rounds": rounds,
        "ms_per_token": {"coder": coder_s * 1e3, "reasoner": reasoner_s * 1e3},
        "workload": {
            "requests": n_arrivals,
            "surge_requests": n_surge,
            "by_kind": {
                k.value: sum(a.kind is k for w in workloads for a in w) for k in SERVED_KINDS
            },
        },
        "policies": {
            p: policy_report(summarize(records[p], elapsed[p]), busy[p]) for p in options.policies
        },
    }
    if options.print_report:
        print_report(report, console)
    return report


def _play(
    policy: str,
    specs: Sequence[ModelSpec],
    arrivals: Sequence[DemoArrival],
    duration_s: float,
    live: _Live,
    grace_s: float,
    options: DemoOptions,
    console: Any,
    metrics: DemoMetrics | None,
) -> tuple[ReplayResult, dict[str, float]]:
    """One policy's round, under the live display when there is a terminal to show it on."""
    from rich.live import Live

    async def run() -> tuple[ReplayResult, dict[str, float]]:
        return await _run_policy(
            policy, specs, arrivals, duration_s, live, grace_s, options.scoring, metrics
        )

    async def main() -> tuple[ReplayResult, dict[str, float]]:
        if not (options.live and console.is_terminal):
            return await run()
        with Live(_live_view(live), console=console, refresh_per_second=4, transient=True) as lv:

            async def refresh() -> None:
                while True:
                    lv.update(_live_view(live))
                    await anyio.sleep(0.25)

            async with anyio.create_task_group() as tg:
                tg.start_soon(refresh)
                result = await run()
                tg.cancel_scope.cancel()
            return result

    result = anyio.run(main)
    console.print(f"{live.policy}: done in {result[0].elapsed_s:.1f}s")
    return result
