"""``zeta demo``: a calm phase and a surge on three real llama.cpp models, static vs dynamic.

The demo generates (or finds cached) the model ladder's embedder, coder and reasoner, measures
how fast this machine runs them (side by side, as they run in the demo: one sequence alone and
every slot busy), and derives one seeded, open-loop workload per round from that, in two
phases of equal length:

* **calm**: the coder's kinds (chat and code) and reasoning each at half of their model's
  capacity, embeddings throughout. Nothing is overloaded; routing should cost nothing here.
* **surge**: planning (reasoning) requests at :data:`SURGE_LOAD` times the reasoner's capacity,
  the coder's kinds at :data:`SURGE_CODER_LOAD` of its own. The reasoner alone cannot keep up,
  but the coder can serve reasoning, at a fraction of the reasoner's cost: the surge is
  absorbable, the case zeta is for. (A surge of code cannot be absorbed on a small CPU host:
  the reasoner would serve code at several times the coder's cost and slow the coder beside it;
  ``python -m bench policies`` has both.)

Each phase gets at least :attr:`DemoOptions.phase_requests` requests per policy (200 by default,
enough for a p99 that is not one unlucky request), which on the 2-core reference machine takes
about a minute in all. The same workload is replayed (:func:`zeta.testing.replay`) against a
fresh :class:`~zeta.Scheduler` per policy, in rounds that alternate the order (A B, B A) so
that a change in the machine's background load does not favour one policy. Under ``static``
each kind waits for its own model however long its queue; under ``dynamic`` the scoring kernel
moves work to the other model while that is expected to finish sooner. The report gives, per
phase, p50/p95/p99 latency overall and per kind, and the share of requests served by a model
that does not prefer their kind, per policy.

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
from dataclasses import dataclass, field, replace
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

# Workload shape. Loads are shares of a model's capacity: the requests per second it serves
# with every slot busy, as measured side by side on this machine (:func:`measure_models`).
SIMPLE_TOKENS, CODE_TOKENS, REASON_TOKENS = 24, 48, 48
EMBED_TEXTS = 4
#: Share of the coder's load that is chat (``simple``); the rest is code.
SIMPLE_SHARE = 0.4
#: Calm: the coder's kinds and reasoning each at this share of their model's capacity.
CALM_LOAD = 0.5
#: Surge: reasoning at SURGE_LOAD of the reasoner's capacity (its queue grows by half its
#: capacity every second under static rules), the coder's kinds at SURGE_CODER_LOAD of the
#: coder's, which leaves the coder room for the excess.
SURGE_LOAD, SURGE_CODER_LOAD = 1.5, 0.3
EMBED_RATE_PER_S = 1.5
#: Phases, in order.
PHASES = ("calm", "surge")

# A cap that only binds on very fast models (the tiny test rungs), keeping a run light there.
MAX_RATE_PER_S = 20.0

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
        duration_s: wall time of the whole workload, split evenly between the policies, the
            rounds and the two phases; by default (``None``) as long as ``phase_requests``
            needs.
        phase_requests: requests each policy should get in each phase, over all rounds (the
            expected count at the measured rates; used when ``duration_s`` is ``None``).
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

    duration_s: float | None = None
    phase_requests: int = 200
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
    embed (then ``prompt`` is empty) or a completion's difficulty, and whether it arrives in the
    surge phase."""

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


@dataclass(frozen=True, slots=True)
class ModelSpeed:
    """Seconds per generated token of one model, measured side by side with the others:
    ``alone_s`` with one sequence, ``full_s`` with every slot busy (the batch's step time over
    its sequences: the cost of a token at full occupancy)."""

    alone_s: float
    full_s: float

    def capacity(self, tokens: int) -> float:
        """Requests of ``tokens`` tokens per second with every slot busy."""
        return 1.0 / (tokens * self.full_s)


def measure_models(specs: Sequence[ModelSpec], tokens: int = 32) -> dict[str, ModelSpeed]:
    """How fast each model generates on this machine, all running at once.

    The models run side by side during the demo, sharing cores and memory bandwidth, so they are
    timed side by side too: each in its own thread, best of two runs of one completion alone
    and of ``slots`` completions decoded together.
    """
    backends = [get_backend(s.backend)(replace(s, n_ctx=256), 0) for s in specs]
    speeds: dict[str, ModelSpeed] = {}

    def measure(backend: Any) -> None:
        alone = full = math.inf
        for i in range(2):
            c = backend.complete(CompletionParams(f"calibration run {i}", max_tokens=tokens))
            alone = min(alone, (c.service_s - c.first_token_s) / max(c.completion_tokens - 1, 1))
            slots = backend.spec.slots
            for seq in range(slots):
                params = CompletionParams(f"calibration run {i}.{seq}", max_tokens=tokens)
                backend.admit(seq, params, None)
            t0, generated, left = time.perf_counter(), 0, slots
            while left:
                for _, c in backend.step():
                    generated += c.completion_tokens
                    left -= 1
            full = min(full, (time.perf_counter() - t0) / max(generated, 1))
        speeds[backend.spec.name] = ModelSpeed(alone, full)

    try:
        threads = [threading.Thread(target=measure, args=(b,)) for b in backends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for b in backends:
            b.close()
    missing = [s.name for s in specs if s.name not in speeds]
    if missing:
        raise RuntimeError(f"could not measure {', '.join(missing)} (see the log)")
    return speeds


# --------------------------------------------------------------------------------------------
# The workload.


def _text(rng: random.Random, n_words: int, lead: str = "") -> str:
    return lead + " ".join(rng.choice(_WORDS) for _ in range(n_words))


def phase_rates(coder: ModelSpeed, reasoner: ModelSpeed) -> dict[str, dict[Kind, float]]:
    """Arrival rates per phase and kind (requests per second) for models of these speeds."""
    code_cap = coder.capacity(CODE_TOKENS)
    simple_cap = coder.capacity(SIMPLE_TOKENS)
    reason_cap = reasoner.capacity(REASON_TOKENS)

    def rates(coder_load: float, reason_load: float) -> dict[Kind, float]:
        out = {
            Kind.SIMPLE: SIMPLE_SHARE * coder_load * simple_cap,
            Kind.CODE: (1.0 - SIMPLE_SHARE) * coder_load * code_cap,
            Kind.REASON: reason_load * reason_cap,
            Kind.EMBED: EMBED_RATE_PER_S,
        }
        return {k: min(v, MAX_RATE_PER_S) for k, v in out.items()}

    return {"calm": rates(CALM_LOAD, CALM_LOAD), "surge": rates(SURGE_CODER_LOAD, SURGE_LOAD)}


def build_workload(
    phase_s: float, coder: ModelSpeed, reasoner: ModelSpeed, seed: int
) -> list[DemoArrival]:
    """The open-loop arrivals of one round: ``phase_s`` seconds of calm, then ``phase_s`` of
    surge (:func:`phase_rates`), Poisson per kind. Sorted by time; deterministic for its
    arguments.
    """
    rng = random.Random(seed)
    arrivals: list[DemoArrival] = []
    system = "You are a coding agent. Use the tools. "
    for n, (phase, rates) in enumerate(phase_rates(coder, reasoner).items()):
        start, end = n * phase_s, (n + 1) * phase_s
        surge = phase == "surge"
        for kind, rate in rates.items():
            t = start + rng.expovariate(rate) if rate > 0 else math.inf
            while t < end:
                arrivals.append(_arrival(rng, t, kind, system, surge))
                t += rng.expovariate(rate)
    arrivals.sort(key=lambda a: a.at)
    return arrivals


def _arrival(rng: random.Random, t: float, kind: Kind, system: str, surge: bool) -> DemoArrival:
    if kind is Kind.EMBED:
        texts = tuple(_text(rng, 12) for _ in range(EMBED_TEXTS))
        return DemoArrival(t, kind, "", 0, texts=texts, surge=surge)
    if kind is Kind.SIMPLE:
        return DemoArrival(t, kind, _text(rng, 8, "hi, "), SIMPLE_TOKENS, surge=surge)
    if kind is Kind.CODE:
        return DemoArrival(t, kind, _text(rng, 24, system + "def "), CODE_TOKENS, surge=surge)
    # Planning steps in a surge are short hops: easier than standalone reasoning.
    lead, (low, high) = ("plan: ", (0.1, 0.5)) if surge else ("think: ", (0.3, 0.9))
    difficulty = rng.uniform(low, high)
    prompt = _text(rng, 24, system + lead)
    return DemoArrival(t, kind, prompt, REASON_TOKENS, difficulty=difficulty, surge=surge)


def phase_length(rates: Mapping[str, Mapping[Kind, float]], requests: int, rounds: int) -> float:
    """Seconds per phase per round for at least ``requests`` arrivals in every phase over
    ``rounds`` rounds: the expected count is three standard deviations of a Poisson count above
    ``requests``, so a seed falls short about once in a thousand."""
    slowest = min(sum(r.values()) for r in rates.values())
    return (requests + 3.0 * math.sqrt(requests)) / (rounds * slowest)


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


def phase_report(summary: ReplaySummary) -> dict[str, Any]:
    """One policy's part of one phase (JSON-ready): requests, p50/p95/p99 latency overall and
    per kind (``None`` where none succeeded), the spilled share, and failed requests."""
    d = summary.to_dict()
    keys = ("requests", "ok", "p50_s", "p95_s", "p99_s")
    return {
        **{key: d["latency"][key] for key in keys},
        "kinds": {kind: {key: stats[key] for key in keys} for kind, stats in d["by_kind"].items()},
        "spilled_share": d["spilled_share"],
        "failed": summary.failed,
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
    """The per-model table, the side-by-side of the policies over the whole run, and one table
    per phase with the headline ratio."""
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

    for phase, runs in report["phases"].items():
        table = Table(title=f"{phase} phase: latency (ms)", title_justify="left")
        table.add_column("kind")
        for policy in policies:
            table.add_column(f"{policy}\nn  p50 / p95 / p99", justify="right")
        for row in ("all", *(k.value for k in SERVED_KINDS)):
            cells = []
            for policy in policies:
                c = runs[policy] if row == "all" else runs[policy]["kinds"][row]
                cells.append(
                    f"{c['requests']}  {_ms(c['p50_s'])} / {_ms(c['p95_s'])} / {_ms(c['p99_s'])}"
                )
            table.add_row(row, *cells)
        table.add_section()
        table.add_row("spilled", *(f"{runs[p]['spilled_share']:.1%}" for p in policies))
        console.print(table)
    if {"static", "dynamic"} <= set(policies):
        parts = []
        for phase, runs in report["phases"].items():
            st, dy = runs["static"], runs["dynamic"]
            for q in ("p50_s", "p99_s"):
                if st[q] and dy[q] is not None:
                    parts.append(f"{phase} {q[:3]} {dy[q] / st[q]:.2f}x")
        console.print("dynamic vs static: " + ", ".join(parts))


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
    if not options.policies:
        raise ValueError("the demo needs at least one policy")
    if options.duration_s is not None and not options.duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {options.duration_s!r}")
    if options.phase_requests < 1:
        raise ValueError(f"phase_requests must be at least 1, got {options.phase_requests!r}")
    with console.status("preparing models (generated on first run)..."):
        specs = demo_models(options)
        by_name = {s.name: s for s in specs}
        speeds = measure_models([by_name["coder"], by_name["reasoner"]])
        coder, reasoner = speeds["coder"], speeds["reasoner"]
    rounds = max(1, options.rounds)
    n_policies = len(options.policies)
    rates = phase_rates(coder, reasoner)
    if options.duration_s is None:
        phase_s = phase_length(rates, options.phase_requests, rounds)
    else:
        phase_s = options.duration_s / (len(PHASES) * n_policies * rounds)
    segment_s = len(PHASES) * phase_s
    workloads = [build_workload(phase_s, coder, reasoner, options.seed + r) for r in range(rounds)]
    n_arrivals = sum(len(w) for w in workloads)
    n_surge = sum(a.surge for w in workloads for a in w)
    grace_s = max(5.0, segment_s)
    console.print(
        f"zeta demo: {n_arrivals} requests per policy ({n_arrivals - n_surge} calm, {n_surge} "
        f"in the surge) in {rounds} rounds of {phase_s:.1f}s calm + {phase_s:.1f}s surge, "
        f"about {segment_s * rounds * n_policies:.0f}s in all\n"
        f"measured side by side, ms per token alone / at full occupancy (step / slots): "
        f"coder {coder.alone_s * 1e3:.1f} / {coder.full_s * 1e3:.1f}, "
        f"reasoner {reasoner.alone_s * 1e3:.1f} / {reasoner.full_s * 1e3:.1f}\n"
        f"surge: reasoning at {SURGE_LOAD:.0%} of the reasoner's capacity, the coder's kinds at "
        f"{SURGE_CODER_LOAD:.0%} of the coder's"
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
    phases: dict[str, dict[str, Any]] = {}
    for n, phase in enumerate(PHASES):
        lo, hi = n * phase_s, (n + 1) * phase_s
        phases[phase] = {
            p: phase_report(summarize([x for x in records[p] if lo <= x.at < hi], rounds * phase_s))
            for p in options.policies
        }
    report: dict[str, Any] = {
        "duration_s": segment_s * rounds * n_policies,
        "phase_s": phase_s,
        "seed": options.seed,
        "rounds": rounds,
        "ms_per_token": {
            name: {"alone": v.alone_s * 1e3, "full": v.full_s * 1e3} for name, v in speeds.items()
        },
        "rates_per_s": {
            phase: {k.value: v for k, v in by_kind.items()} for phase, by_kind in rates.items()
        },
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
        "phases": phases,
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
