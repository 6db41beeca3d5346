"""The default feedback calibrator: refit, tune by counterfactual replay, guard with rollback.

Each run (every ``interval_s``, off the event loop) looks at the window of requests that
arrived in the last ``interval_s`` and finished:

1. **Refit** each model's service model (per-call overhead, per prompt token, per output token
   as a function of busy slots and of the other busy models on its device) from a reservoir
   stratified by load (:class:`~zeta._calibration.FitStore`), with a robust, recency-weighted
   regression (:func:`~zeta._calibration.fit_service`), and feed it to the kernel: each row's
   step slope, and its typical request as an observation.
2. **Guard** the change in flight, if any: the live objective of this window against what the
   replay predicted when the change was made, adjusted for the traffic (the replay of this
   window under the applied parameters over the replay of the old window under them) and for
   the simulator's bias (live over replayed before the change). Worse by more than
   ``rollback_margin``: roll back to the last good parameters, and tune nothing this run.
3. **Tune**: replay the window's actual arrivals in :func:`zeta.sim.simulate` on the fitted
   fleet under the current parameters and up to ``candidates`` neighbours (one parameter moved
   by ``max_step``, at most 25%, within :data:`BOUNDS`), all with the same seed; apply the best
   if it beats the current parameters by ``margin`` (hysteresis). One change in flight at a time.

The objective (:func:`objective`) is a latency quantile (default p95) over served requests,
multiplied by ``1 + 10 * (spilled - quality_budget)`` when the spilled share exceeds the budget.

Caps per run, whatever the traffic: at most ``max_samples`` samples (default 4096) in the log,
at most 864 per model in the fit reservoir, at most ``(candidates + 2) * max_replay_requests``
simulated requests (default 16,000: well under a second at the simulator's speed).

:class:`FeedbackCalibrator` is the pure core (:meth:`~FeedbackCalibrator.step`, driven by any
clock) and the live calibrator (:meth:`~FeedbackCalibrator.calibrate`, which runs the step in a
worker thread). :func:`simulate_calibrated` drives it inside the simulator in virtual time, with
scripted slowdowns and wrong priors, for the benchmark and the tests.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt

from .._calibration import (
    CalibrationDecision,
    CalibrationView,
    FitStore,
    Sample,
    SampleLog,
    ServiceFit,
    apply_decision,
    concurrency,
    fit_service,
)
from .._config import CalibrationSettings
from .._policies import Policy
from .._scoring_py import MAX_STEP_SLOPE
from .._types import SERVED_KINDS, ModelSpec, Priority, Scoring
from ..telemetry._logging import get_logger
from ._context import Job
from ._engine import _Run, simulate
from ._profile import Fleet, ServiceProfile, SimModel, linear_steps
from ._stats import SimResult
from ._workload import SimRequest

__all__ = [
    "BOUNDS",
    "FeedbackCalibrator",
    "Slowdown",
    "feedback_calibrator",
    "objective",
    "simulate_calibrated",
]

log = get_logger(__name__)

#: The range the calibrator keeps each parameter in (it never moves a parameter out of it, and
#: leaves alone one a user set outside it).
BOUNDS: Mapping[str, tuple[float, float]] = {
    "tau": (0.25, 60.0),
    "contention_weight": (0.02, 20.0),
    "spill_penalty": (0.01, 30.0),
    "quality_penalty": (0.005, 10.0),
    "harm_weight": (0.02, 10.0),
    "co_slow": (0.02, 5.0),
}
#: Bounds of a parameter not in :data:`BOUNDS` (one the kernel adds later).
DEFAULT_BOUNDS = (1e-3, 1e3)

#: Relative jitter of the replayed fleet's service times.
REPLAY_JITTER = 0.1
#: Weight of each unit of spilled share above the quality budget.
SPILL_WEIGHT = 10.0

_QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


def bounds_of(name: str) -> tuple[float, float]:
    return BOUNDS.get(name, DEFAULT_BOUNDS)


def objective(
    latency: npt.NDArray[np.float64], spilled_share: float, settings: CalibrationSettings
) -> float:
    """The objective of a window: the latency statistic of the served requests (NaN for none),
    times the quality penalty."""
    lat = latency[np.isfinite(latency)]
    if lat.size == 0:
        return math.nan
    if settings.objective == "mean":
        value = float(lat.mean())
    else:
        q = _QUANTILES[settings.objective]
        value = float(np.quantile(lat, q, method="inverted_cdf"))
    excess = max(0.0, spilled_share - settings.quality_budget)
    return value * (1.0 + SPILL_WEIGHT * excess)


def _result_objective(result: SimResult, settings: CalibrationSettings) -> float:
    ok = result.model >= 0
    spilled = float(result.spilled[ok].mean()) if ok.any() else 0.0
    value = objective(result.latency[ok], spilled, settings)
    refused = result.refused
    if refused and math.isfinite(value):  # a refusal is the worst outcome: count it heavily
        value *= 1.0 + 10.0 * refused / max(1, result.requests)
    return value


@dataclass
class _Pending:
    """The change in flight: what it replaced, what it was predicted to give."""

    previous: dict[str, float]
    applied: dict[str, float]
    predicted: float  # the objective claimed when it was made
    replay_then: float  # the replay of the applied parameters on that window
    bias: float  # live / replayed objective of the window before the change
    injected: bool = False


class FeedbackCalibrator:
    """Refit, replay-tuned parameters, and a guard that rolls back (see the module docstring).

    Args:
        settings: the ``[calibration]`` settings.
        models: the configured models (kinds, preferences, quality, slots, devices).
        lanes: per device (``None`` for the host CPU, else a GPU index), how many busy models
            saturate its utilisation reading, for the replay; 1 when not given.
        seed: the replays' seed (the same for every candidate of a run: paired comparisons).
    """

    def __init__(
        self,
        settings: CalibrationSettings,
        models: Sequence[ModelSpec],
        *,
        lanes: Mapping[int | None, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.models = tuple(models)
        self.lanes = dict(lanes or {})
        self.seed = seed
        self.store = FitStore()
        self.fits: dict[str, ServiceFit] = {}
        self.last_good: dict[str, float] | None = None
        self.pending: _Pending | None = None
        self.counts: Counter[str] = Counter()
        self.runs = 0
        self.last: CalibrationDecision | None = None
        self._pushed = -math.inf
        self._rotation = 0
        self._inject: dict[str, float] | None = None
        self._lock = threading.Lock()
        self._devices = {m.name: m.device for m in self.models}

    # -- the test hook -------------------------------------------------------------------
    def inject(self, proposal: Mapping[str, float]) -> None:
        """Make the next run apply ``proposal`` (unbounded, predicted as good as the current
        parameters), as a deliberately bad change for testing the guard."""
        self._inject = dict(proposal)

    # -- live ------------------------------------------------------------------------------
    async def calibrate(self, view: CalibrationView) -> CalibrationDecision:
        """One run on a worker thread (the event loop keeps serving)."""
        samples = list(view.samples)
        params = dict(view.params)
        fallback: dict[str, tuple[float, float]] = {}
        for m in view.snapshot.models:
            if m.name not in fallback or m.ewma_token_s > fallback[m.name][1]:
                fallback[m.name] = (m.ewma_request_s, m.ewma_token_s)
        now = view.now
        return await anyio.to_thread.run_sync(self.safe_step, samples, params, now, fallback)

    def safe_step(
        self,
        samples: Sequence[Sample],
        params: Mapping[str, float],
        now: float,
        fallback: Mapping[str, tuple[float, float]] | None = None,
    ) -> CalibrationDecision:
        """:meth:`step`, but an exception becomes a ``"failed"`` decision that restores the last
        good parameters if a change was in flight (logged as ``calibration_failed``)."""
        with self._lock:
            try:
                decision = self.step(samples, params, now, fallback)
            except Exception as exc:
                log.warning("calibration_failed", error=repr(exc))
                restore: dict[str, float] = {}
                if self.pending is not None:
                    restore = dict(self.pending.previous)
                    self.pending = None
                decision = CalibrationDecision(
                    params=restore, action="failed", detail={"error": repr(exc)}
                )
                self.counts["failed"] += 1
                self.last = decision
            return decision

    # -- the core --------------------------------------------------------------------------
    def step(
        self,
        samples: Sequence[Sample],
        params: Mapping[str, float],
        now: float,
        fallback: Mapping[str, tuple[float, float]] | None = None,
    ) -> CalibrationDecision:
        """One calibration run over ``samples`` (finished requests, any order) at time ``now``
        with ``params`` in force. Pure but for this object's own state (fit reservoir, the change
        in flight, counters); no clock, no I/O."""
        s = self.settings
        self.runs += 1
        params = {k: float(v) for k, v in params.items()}
        if self.last_good is None:
            self.last_good = dict(params)
        samples = sorted(samples, key=lambda x: x.end)[-s.max_samples :]
        fits = self._refit(samples, now) if s.refit else {}
        window = [x for x in samples if x.at >= now - s.interval_s]
        live = self._live(window)
        base = CalibrationDecision(fits=fits, objective=live, requests=len(window))

        if len(window) < s.min_requests or not math.isfinite(live):
            return self._done(base, "skipped", detail={"reason": "too few requests"})
        fleet = self.fleet(fallback or {})
        replay = _Replay(fleet, window[-s.max_replay_requests :], s, self.seed)
        current = replay(params)
        if not math.isfinite(current) or current <= 0.0:
            return self._done(base, "skipped", predicted_before=current)

        pending = self.pending
        if pending is not None:
            traffic = current / pending.replay_then if pending.replay_then > 0 else 1.0
            expected = pending.bias * pending.predicted * traffic
            guard = {"live_s": live, "expected_s": expected, "traffic": traffic}
            self.pending = None
            if live > expected * (1.0 + s.rollback_margin):
                restore = dict(pending.previous)
                return self._done(
                    base, "rolled_back", restore, current, replay(restore),
                    detail={"guard": guard},
                )  # fmt: skip
            self.last_good = dict(pending.applied)
            base = CalibrationDecision(
                fits=fits, objective=live, requests=len(window), detail={"guard": guard}
            )

        bias = live / current
        if self._inject is not None:
            proposal = {**params, **self._inject}
            self._inject = None
            self.pending = _Pending(params, proposal, current, replay(proposal), bias, True)
            changes = {k: v for k, v in proposal.items() if params.get(k) != v}
            return self._done(base, "applied", changes, current, current, {"injected": True})

        tried: dict[str, float] = {}
        best, best_value = None, current
        for cand in self.candidates(params):
            value = replay(cand)
            name = ",".join(f"{k}={v:.4g}" for k, v in cand.items() if params[k] != v)
            tried[name] = value
            if math.isfinite(value) and value < best_value:
                best, best_value = cand, value
        if best is not None and best_value < current * (1.0 - s.margin):
            self.pending = _Pending(params, best, best_value, best_value, bias)
            changes = {k: v for k, v in best.items() if params[k] != v}
            return self._done(base, "applied", changes, current, best_value, {"candidates": tried})
        return self._done(base, "rejected", {}, current, current, {"candidates": tried})

    def _done(
        self,
        base: CalibrationDecision,
        action: str,
        params: Mapping[str, float] | None = None,
        predicted_before: float = math.nan,
        predicted_after: float = math.nan,
        detail: Mapping[str, Any] | None = None,
    ) -> CalibrationDecision:
        self.counts[action] += 1
        decision = CalibrationDecision(
            params=dict(params or {}),
            fits=base.fits,
            feed=self.settings.feed,
            action=action,
            objective=base.objective,
            predicted_before=predicted_before,
            predicted_after=predicted_after,
            requests=base.requests,
            detail={**base.detail, **(detail or {})},
        )
        self.last = decision
        return decision

    def candidates(self, params: Mapping[str, float]) -> list[dict[str, float]]:
        """Up to ``candidates`` neighbours of ``params``: one tunable parameter moved up or down
        by ``max_step`` (relative), clamped to its :data:`BOUNDS`; the parameters to move rotate
        from run to run. A parameter outside its bounds is left alone."""
        s = self.settings
        names = [n for n in s.tune if n in params]
        out: list[dict[str, float]] = []
        if not names:
            return out
        for k in range(len(names)):
            if len(out) >= s.candidates:
                break
            name = names[(self._rotation + k) % len(names)]
            v = params[name]
            lo, hi = bounds_of(name)
            if not lo <= v <= hi:
                continue
            for moved in (min(hi, v * (1.0 + s.max_step)), max(lo, v * (1.0 - s.max_step))):
                if moved != v and len(out) < s.candidates:
                    out.append({**params, name: moved})
        self._rotation = (self._rotation + max(1, s.candidates // 2)) % len(names)
        return out

    # -- pieces ----------------------------------------------------------------------------
    def _live(self, window: Sequence[Sample]) -> float:
        if not window:
            return math.nan
        lat = np.array([x.latency for x in window])
        spilled = float(np.mean([x.spilled for x in window]))
        return objective(lat, spilled, self.settings)

    def _refit(self, samples: Sequence[Sample], now: float) -> dict[str, ServiceFit]:
        if samples:
            loaded = concurrency(samples, self._devices)
            self.store.add(x for x in loaded if x.sample.end > self._pushed)
            self._pushed = max(self._pushed, samples[-1].end)
        half_life = 2.0 * self.settings.interval_s
        for name in self.store.models():
            fit = fit_service(name, self.store.of(name), now, half_life)
            if fit is not None:
                old = self.fits.get(name)
                # Keep the last slope or co-load when this window could not see one.
                slope = fit.step_slope
                co = fit.co_slow
                token = fit.token_s
                if not math.isfinite(slope):
                    slope = old.step_slope if old is not None else math.nan
                if not math.isfinite(co):
                    co = old.co_slow if old is not None else math.nan
                if not math.isfinite(token) and old is not None:
                    token = old.token_s
                self.fits[name] = ServiceFit(
                    name, fit.call_s, fit.prefill_token_s, token, slope, co, fit.samples,
                    fit.typical_prompt,
                )  # fmt: skip
        # What the kernel is fed: fits with a decode time (a slope only when one was seen).
        return {n: f for n, f in self.fits.items() if math.isfinite(f.token_s)}

    def fleet(self, fallback: Mapping[str, tuple[float, float]]) -> Fleet:
        """The fitted fleet the replays run on (a model without a fit: its kernel estimates,
        else the slowest fitted model's profile)."""
        by_device: Counter[int | None] = Counter(m.device for m in self.models)
        fitted = [f for f in self.fits.values() if math.isfinite(f.token_s)]
        slowest = max(fitted, key=lambda f: f.token_s, default=None)
        out = []
        for spec in self.models:
            fit = self.fits.get(spec.name)
            if fit is not None and math.isfinite(fit.token_s):
                call, prefill, tok = fit.call_s, fit.prefill_token_s, fit.token_s
                slope = fit.step_slope if math.isfinite(fit.step_slope) else 0.15
                co = fit.co_slow if math.isfinite(fit.co_slow) else 0.0
            else:
                req, tok = fallback.get(spec.name, (0.0, 0.0))
                call, prefill, slope, co = req, 0.0, 0.15, 0.0
                if tok <= 0.0 and slowest is not None:
                    call, prefill, tok = slowest.call_s, slowest.prefill_token_s, slowest.token_s
                if tok <= 0.0:
                    tok = 0.01
                if fit is not None:
                    call, prefill = fit.call_s, fit.prefill_token_s
            slope = min(max(slope, 0.0), MAX_STEP_SLOPE)
            others = max(1, by_device[spec.device])
            coload = tuple(1.0 + co * j for j in range(others))
            profile = ServiceProfile(
                call, prefill, linear_steps(max(tok, 1e-9), slope, spec.slots), coload,
                REPLAY_JITTER,
            )  # fmt: skip
            replicas = spec.replicas
            sim_spec = ModelSpec(
                spec.name, kinds=spec.kinds, preferred=spec.preferred, quality=spec.quality,
                replicas=replicas, slots=spec.slots, device=spec.device, backend="simulated",
            )  # fmt: skip
            out.append(SimModel(sim_spec, profile))
        return Fleet(tuple(out), self.lanes)

    def snapshot(self) -> CalibrationState:
        """Counters, fits and the last decision, for the metrics collector."""
        return CalibrationState(
            counts=dict(self.counts),
            fits=dict(self.fits),
            last=self.last,
        )


@dataclass(frozen=True, slots=True)
class CalibrationState:
    """What the collector reads of a calibrator at scrape time."""

    counts: Mapping[str, int] = field(default_factory=dict)
    fits: Mapping[str, ServiceFit] = field(default_factory=dict)
    last: CalibrationDecision | None = None


class _Replay:
    """Replays one window's arrivals on a fitted fleet under given parameters (memoised)."""

    def __init__(
        self, fleet: Fleet, window: Sequence[Sample], settings: CalibrationSettings, seed: int
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self.seed = seed
        t0 = min(x.at for x in window)
        names = {m.name for m in fleet.models}
        self.requests = [
            SimRequest(
                x.at - t0,
                SERVED_KINDS[x.kind],
                max(0, x.prompt_tokens),
                max(0, x.output_tokens),
                max(x.max_tokens, x.output_tokens, 0),
                Priority(min(2, max(0, x.priority))),
                min(1.0, max(0.0, x.difficulty)),
            )
            for x in sorted(window, key=lambda x: x.at)
            if x.model in names
        ]
        self._memo: dict[tuple[tuple[str, float], ...], float] = {}

    def __call__(self, params: Mapping[str, float]) -> float:
        key = tuple(sorted(params.items()))
        if key not in self._memo:
            result = simulate(
                self.fleet,
                self.requests,
                "dynamic",
                scoring=Scoring(**params),
                seed=self.seed,
                priors=True,
            )
            self._memo[key] = _result_objective(result, self.settings)
        return self._memo[key]


def feedback_calibrator(
    settings: CalibrationSettings, models: Sequence[ModelSpec]
) -> FeedbackCalibrator:
    """The default calibrator for ``models`` (what ``Scheduler(calibrator="feedback")`` loads).

    Host-CPU models are replayed with as many lanes as there are CPU models (their readings
    saturate when all run); a GPU with 1."""
    cpu = sum(1 for m in models if m.device is None)
    lanes: dict[int | None, float] = {None: float(max(1, cpu))}
    return FeedbackCalibrator(settings, models, lanes=lanes)


# -- in the simulator -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Slowdown:
    """At ``at`` seconds, ``model``'s service times (overhead, prefill, steps) are multiplied by
    ``factor`` (as when another tenant takes its device)."""

    at: float
    model: str
    factor: float


@dataclass(frozen=True, slots=True)
class CalibratedResult:
    """A run with calibration: the simulator's result and each run's time, parameters in force
    afterwards, and decision."""

    result: SimResult
    runs: tuple[tuple[float, dict[str, float], CalibrationDecision], ...]


class _CalibratedRun(_Run):
    """The simulator's run with calibration runs at every ``interval`` of virtual time and
    scripted slowdowns, both applied at the first arrival on or after their time."""

    def __init__(
        self,
        fleet: Fleet,
        policy: str | Policy,
        *,
        calibrator: FeedbackCalibrator | None,
        interval: float,
        slowdowns: Sequence[Slowdown],
        wrong_priors: Mapping[str, tuple[float, float, float]],
        **kwargs: Any,
    ) -> None:
        super().__init__(fleet, policy, **kwargs)
        self.cal = calibrator
        self.interval = interval
        self.next_cal = interval
        self.slowdowns = sorted(slowdowns, key=lambda s: s.at)
        self.open: list[Job] = []
        self.log = SampleLog(calibrator.settings.max_samples if calibrator else 64)
        self.runs: list[tuple[float, dict[str, float], CalibrationDecision]] = []
        for c in self.router.candidates:
            if c.model in wrong_priors:
                req, tok, slope = wrong_priors[c.model]
                self.table.set_step_slope(c.index, slope)
                self.table.observe(c.index, req, tok, 0.0, 1)

    def arrive(self, job: Job, now: float) -> None:
        while self.slowdowns and self.slowdowns[0].at <= now:
            self._slow(self.slowdowns.pop(0), now)
        if self.cal is not None and now >= self.next_cal:
            self._calibrate(now)
            while self.next_cal <= now:
                self.next_cal += self.interval
        if self.cal is not None:
            self.open.append(job)
        super().arrive(job, now)

    def _slow(self, event: Slowdown, now: float) -> None:
        f = event.factor
        for ctx in self.contexts:
            if ctx.name == event.model:
                ctx.advance(now)
                ctx.step = tuple(s * f for s in ctx.step)
                ctx.call_s *= f
                ctx.prefill_s *= f
                ctx.pre_left *= f
                ctx.version += 1
                self.times[ctx.index] = ctx.next_time()

    def _calibrate(self, now: float) -> None:
        assert self.cal is not None
        still: list[Job] = []
        contexts = self.contexts
        for job in self.open:
            if job.refused:
                continue
            if job.finish <= now:  # NaN (not finished) compares false
                ctx = contexts[job.model]
                self.log.add(
                    Sample(
                        ctx.name, job.ki, job.at, job.started, job.first, job.finish,
                        job.prompt, job.output, int(job.route.est_tokens), job.priority,
                        job.route.difficulty, job.kind not in ctx.preferred,
                    )
                )  # fmt: skip
            else:
                still.append(job)
        self.open = still
        samples = self.log.since(-math.inf)
        fallback = {}
        for c in self.router.candidates:
            fallback[c.model] = self.table.ewma(c.index)
        decision = self.cal.safe_step(samples, self.router.scoring.as_dict(), now, fallback)
        apply_decision(self.router, decision, now)
        self.runs.append((now, self.router.scoring.as_dict(), decision))


def simulate_calibrated(
    fleet: Fleet,
    workload: Sequence[SimRequest],
    policy: str | Policy = "dynamic",
    *,
    calibrator: FeedbackCalibrator | None = None,
    interval: float = 30.0,
    slowdowns: Sequence[Slowdown] = (),
    wrong_priors: Mapping[str, tuple[float, float, float]] | None = None,
    scoring: Scoring = Scoring(),
    seed: int = 0,
    priors: bool = False,
    mailbox_capacity: int = 64,
    admission_timeout: float | None = None,
) -> CalibratedResult:
    """:func:`~zeta.sim.simulate` with ``calibrator`` run every ``interval`` seconds of virtual
    time on the requests finished so far (its decisions applied to the router and kernel as the
    supervisor applies them live), ``slowdowns`` applied on schedule, and ``wrong_priors``
    (model -> ``(per_request_s, per_token_s, step_slope)``) seeded into the kernel at the start.
    """
    run = _CalibratedRun(
        fleet,
        policy,
        calibrator=calibrator,
        interval=interval,
        slowdowns=slowdowns,
        wrong_priors=wrong_priors or {},
        scoring=scoring,
        mailbox_capacity=mailbox_capacity,
        admission_timeout=admission_timeout,
        aging_s=10.0,
        sample_interval=0.5,
        seed=seed,
        priors=priors,
    )
    return CalibratedResult(run.run(workload), tuple(run.runs))
