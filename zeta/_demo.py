"""``zeta demo``: a bursty agent workload on three real llama.cpp models, static vs dynamic.

The demo generates (or finds cached) the model ladder's embedder, coder and reasoner, measures
how fast this machine runs them, and derives one seeded, open-loop workload from that: a steady
mix of chat, code, embedding and reasoning requests, plus surges that queue several seconds of
work on one model: alternately a burst of code requests on the coder and a burst of planning
requests on the reasoner. The same workload is then played against a fresh
:class:`~zeta.Scheduler` per policy, in rounds that alternate the order (A B, B A) so that a
change in the machine's background load does not favour one policy. Under ``static`` each kind
waits for its own model however long its queue; under ``dynamic`` the scoring kernel moves work
to the other model while that is expected to finish sooner. The report gives p50/p95/p99 latency per kind,
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
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import TryAgainError, ZetaError
from ._snapshot import SchedulerSnapshot
from ._types import Kind, ModelSpec
from .backends import CompletionParams, get_backend
from .telemetry._recorder import Recorder
from .testing import _ladder

if TYPE_CHECKING:
    from ._scheduler import Scheduler

__all__ = [
    "DemoMetrics", "DemoOptions", "Job", "Outcome", "build_workload", "run_demo", "summarize",
]  # fmt: skip

#: Kinds in report order.
KINDS: tuple[Kind, ...] = (Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON)

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
#: Scheduler settings of the demo: the library's defaults, so the demo shows what users get.
#: (``--set KEY=NUMBER`` overrides a kernel parameter for every policy.)
DEMO_SCHEDULER_OPTIONS: dict[str, Any] = {}

# Caps that only bind on very fast models (the tiny test rungs), keeping a run light there.
MAX_RATE_PER_S, MAX_SURGE = 20.0, 40

_WORDS = (
    "the model request value data function return class import async await list dict "
    "because therefore first then answer question reason think step result self config "
    "token prompt output input index count format split sort filter reduce sum max min"
).split()


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
        scheduler_options: keyword arguments for every :class:`~zeta.Scheduler` (kernel
            parameters such as ``spill_penalty``), the same for all policies.
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
    scheduler_options: Mapping[str, Any] = field(
        default_factory=lambda: dict(DEMO_SCHEDULER_OPTIONS)
    )


@dataclass(frozen=True, slots=True)
class Job:
    """One request of the workload: when it arrives (seconds from the start) and what it asks."""

    at: float
    kind: Kind
    prompt: str = ""
    texts: tuple[str, ...] = ()
    max_tokens: int = 0
    surge: bool = False
    difficulty: float | None = None


@dataclass(slots=True)
class Outcome:
    """How one job ended under one policy."""

    job: Job
    status: str  # "ok", "rejected" (try again later), "error" or "unfinished"
    latency_s: float = math.nan
    model: str | None = None
    tokens: int = 0
    spilled: bool = False


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
    snapshot: Any = None


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
    import threading

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
) -> list[Job]:
    """The open-loop job list for one run, sized to this machine's measured token times.

    Steady Poisson arrivals per kind at the utilisations above, plus a surge every
    :data:`SURGE_PERIOD_S` from 15% to 80% of the run, alternately code (worth
    :data:`CODE_SURGE_S` of coder time) and reasoning (:data:`REASON_SURGE_S` of reasoner
    time). Deterministic for its arguments.
    """
    rng = random.Random(seed)
    jobs: list[Job] = []
    system = "You are a coding agent. Use the tools. "

    def poisson(rate: float, make: Callable[[float], Job]) -> None:
        rate = min(rate, MAX_RATE_PER_S)
        t = rng.expovariate(rate) if rate > 0 else math.inf
        while t < duration_s:
            jobs.append(make(t))
            t += rng.expovariate(rate)

    simple_rate = CODER_SIMPLE_UTIL / (SIMPLE_TOKENS * coder_token_s)
    code_rate = CODER_CODE_UTIL / (CODE_TOKENS * coder_token_s)
    reason_rate = REASONER_UTIL / (REASON_TOKENS * reasoner_token_s)
    poisson(
        simple_rate,
        lambda t: Job(t, Kind.SIMPLE, _text(rng, 8, "hi, "), max_tokens=SIMPLE_TOKENS),
    )
    poisson(
        code_rate,
        lambda t: Job(t, Kind.CODE, _text(rng, 24, system + "def "), max_tokens=CODE_TOKENS),
    )
    poisson(
        reason_rate,
        lambda t: Job(
            t,
            Kind.REASON,
            _text(rng, 24, "think step by step: "),
            max_tokens=REASON_TOKENS,
            difficulty=rng.uniform(0.3, 0.9),
        ),
    )
    poisson(
        EMBED_RATE_PER_S,
        lambda t: Job(t, Kind.EMBED, texts=tuple(_text(rng, 12) for _ in range(EMBED_TEXTS))),
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
            jobs.append(Job(at, kind, prompt, max_tokens=tokens, surge=True, difficulty=difficulty))
        start += SURGE_PERIOD_S
        n += 1
    jobs.sort(key=lambda j: j.at)
    return jobs


# --------------------------------------------------------------------------------------------
# Running one policy.


async def _run_policy(
    policy: str,
    specs: Sequence[ModelSpec],
    jobs: Sequence[Job],
    duration_s: float,
    live: _Live,
    grace_s: float,
    scheduler_options: Mapping[str, Any],
    metrics: DemoMetrics | None = None,
) -> tuple[list[Outcome], dict[str, dict[str, float]], float]:
    from ._scheduler import Scheduler

    preferred = {s.name: s.preferred for s in specs}
    outcomes: list[Outcome] = [Outcome(job, "unfinished") for job in jobs]

    # Requests wait for mailbox room rather than being refused: the comparison is in latency.
    options = {"admission_timeout": None, **scheduler_options}
    if metrics is not None:
        options["recorder"] = metrics.recorder
    async with Scheduler(models=list(specs), policy=policy, **options) as zs:
        if metrics is not None:
            metrics.scheduler = zs
        # Warm up each model (page in the weights, prime the estimates); not measured.
        for kind, job in _one_per_kind(jobs).items():
            await _submit(zs, job)
            del kind
        busy0 = {m.name: m.busy_s for m in zs.snapshot().models}
        live.duration_s, live.done = duration_s, Counter()
        t0 = time.monotonic()
        live.started = t0

        async def one(i: int, job: Job) -> None:
            await anyio.sleep_until(t0 + job.at)
            out = outcomes[i]
            try:
                result = await _submit(zs, job)
            except TryAgainError:
                out.status = "rejected"
            except ZetaError:
                out.status = "error"
            else:
                out.status = "ok"
                out.latency_s = time.monotonic() - (t0 + job.at)
                out.model = result.model
                out.tokens = getattr(result, "completion_tokens", 0)
                out.spilled = job.kind not in preferred.get(result.model, frozenset())
            live.done[out.status] += 1

        async def watch() -> None:
            while True:
                live.snapshot = zs.snapshot()
                await anyio.sleep(0.2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            with anyio.move_on_after(duration_s + grace_s):
                async with anyio.create_task_group() as jobs_tg:
                    for i, job in enumerate(jobs):
                        jobs_tg.start_soon(one, i, job)
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - t0
        snap = zs.snapshot()
    if metrics is not None:
        metrics.scheduler = None
    per_model: dict[str, dict[str, float]] = defaultdict(dict)
    for m in snap.models:
        busy = m.busy_s - busy0.get(m.name, 0.0)
        per_model[m.name]["busy_share"] = busy / elapsed if elapsed > 0 else 0.0
        per_model[m.name]["restarts"] = float(m.restarts)
    return outcomes, dict(per_model), elapsed


def _one_per_kind(jobs: Sequence[Job]) -> dict[Kind, Job]:
    first: dict[Kind, Job] = {}
    for job in jobs:
        first.setdefault(job.kind, job)
    return first


async def _submit(zs: Any, job: Job) -> Any:
    if job.kind is Kind.EMBED:
        return await zs.embed(list(job.texts))
    return await zs.complete(
        job.prompt, kind=job.kind, max_tokens=job.max_tokens, difficulty=job.difficulty
    )


# --------------------------------------------------------------------------------------------
# Summaries.


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile; NaN for no values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(outcomes: Sequence[Outcome], elapsed_s: float) -> dict[str, Any]:
    """Per-kind latency quantiles, throughput, spilled share and failure counts of one run."""
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.job.kind is kind]
        lat = sorted(o.latency_s for o in mine if o.status == "ok")
        kinds[kind.value] = {
            "requests": len(mine),
            "ok": len(lat),
            "p50_s": _quantile(lat, 0.50),
            "p95_s": _quantile(lat, 0.95),
            "p99_s": _quantile(lat, 0.99),
        }
    ok = [o for o in outcomes if o.status == "ok"]
    statuses = Counter(o.status for o in outcomes)
    models: dict[str, Any] = defaultdict(lambda: {"requests": 0, "tokens": 0, "spilled_in": 0})
    for o in ok:
        assert o.model is not None
        entry = models[o.model]
        entry["requests"] += 1
        entry["tokens"] += o.tokens
        entry["spilled_in"] += int(o.spilled)
    return {
        "elapsed_s": elapsed_s,
        "kinds": kinds,
        "throughput_rps": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "throughput_tokens_per_s": sum(o.tokens for o in ok) / elapsed_s if elapsed_s else 0.0,
        "spilled_share": sum(o.spilled for o in ok) / len(ok) if ok else 0.0,
        "rejected": statuses["rejected"],
        "errors": statuses["error"],
        "unfinished": statuses["unfinished"],
        "models": dict(models),
    }


# --------------------------------------------------------------------------------------------
# Display.


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:,.0f}"


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
            busy = run["model_busy"].get(name, {}).get("busy_share", math.nan)
            per_model.add_row(
                policy, name, str(m["requests"]), f"{m['tokens']:,}", str(m["spilled_in"]),
                "-" if math.isnan(busy) else f"{busy:.0%}",
            )  # fmt: skip
    console.print(per_model)

    side = Table(title="latency (ms) and throughput, same workload", title_justify="left")
    side.add_column("kind")
    side.add_column("n", justify="right")
    for policy in policies:
        side.add_column(f"{policy}\np50 / p95 / p99", justify="right")
    for kind in KINDS:
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
    """Run the demo and return its report (what ``--json`` prints).

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
    n_jobs = sum(len(w) for w in workloads)
    n_surge = sum(j.surge for w in workloads for j in w)
    grace_s = max(5.0, segment_s)
    console.print(
        f"zeta demo: {n_jobs} requests ({n_surge} in surges) per policy, in {rounds} rounds of "
        f"{segment_s:.0f}s\nmeasured side by side: coder {coder_s * 1e3:.1f} ms/token, "
        f"reasoner {reasoner_s * 1e3:.1f} ms/token"
    )
    report: dict[str, Any] = {
        "duration_s": options.duration_s,
        "seed": options.seed,
        "rounds": rounds,
        "ms_per_token": {"coder": coder_s * 1e3, "reasoner": reasoner_s * 1e3},
        "workload": {
            "requests": n_jobs,
            "surge_requests": n_surge,
            "by_kind": {k.value: sum(j.kind is k for w in workloads for j in w) for k in KINDS},
        },
        "policies": {},
    }
    outcomes: dict[str, list[Outcome]] = {p: [] for p in options.policies}
    elapsed: dict[str, float] = dict.fromkeys(options.policies, 0.0)
    busy: dict[str, dict[str, float]] = {p: defaultdict(float) for p in options.policies}
    for r, jobs in enumerate(workloads):
        # A B, then B A: drift in the machine's background load hits every policy alike.
        order = options.policies if r % 2 == 0 else options.policies[::-1]
        for policy in order:
            live = _Live(policy=f"{policy} (round {r + 1}/{rounds})")
            outs, model_busy, took = _play(
                policy, specs, jobs, segment_s, live, grace_s, options, console, metrics
            )
            outcomes[policy].extend(outs)
            elapsed[policy] += took
            for name, m in model_busy.items():
                busy[policy][name] += m["busy_share"] * took
    for policy in options.policies:
        run = summarize(outcomes[policy], elapsed[policy])
        run["model_busy"] = {
            name: {"busy_share": b / elapsed[policy]} for name, b in busy[policy].items()
        }
        report["policies"][policy] = run
    if options.print_report:
        print_report(report, console)
    return _json_safe(report)


def _play(
    policy: str,
    specs: Sequence[ModelSpec],
    jobs: Sequence[Job],
    duration_s: float,
    live: _Live,
    grace_s: float,
    options: DemoOptions,
    console: Any,
    metrics: DemoMetrics | None,
) -> tuple[list[Outcome], dict[str, dict[str, float]], float]:
    from rich.live import Live

    async def main() -> tuple[list[Outcome], dict[str, dict[str, float]], float]:
        if not (options.live and console.is_terminal):
            return await _run_policy(
                policy, specs, jobs, duration_s, live, grace_s, options.scheduler_options, metrics
            )
        with Live(_live_view(live), console=console, refresh_per_second=4, transient=True) as lv:

            async def refresh() -> None:
                while True:
                    lv.update(_live_view(live))
                    await anyio.sleep(0.25)

            async with anyio.create_task_group() as tg:
                tg.start_soon(refresh)
                result = await _run_policy(
                    policy, specs, jobs, duration_s, live, grace_s, options.scheduler_options,
                    metrics,
                )  # fmt: skip
                tg.cancel_scope.cancel()
            return result

    result = anyio.run(main)
    console.print(f"{live.policy}: done in {result[2]:.1f}s")
    return result


def _json_safe(value: Any) -> Any:
    """NaN (a kind with no answered request) becomes ``None``, which JSON can carry."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
