"""The calibration hook: what a calibrator sees, what it may change, and the refit of service models.

The supervisor calls the calibrator on a timer (``Scheduler(calibration_interval=...)``) and on
demand (``await zs.calibrate()``). A calibrator looks at live state and history and returns new
values for some of the scoring parameters (the fields of :class:`~zeta.Scoring`), or a
:class:`CalibrationDecision` that also carries refitted service models for the kernel, or
``None`` to keep everything.

The default calibrator (``zeta.sim``'s feedback calibrator, loaded by name as backends are, since
it replays windows in the simulator, a layer above the scheduler) is built on the pieces here:

* :class:`Sample`: one finished request, with its timings, as the scheduler's ledger (or the
  simulator) saw it; :class:`SampleLog` keeps the last ``max_samples`` of them;
* :func:`concurrency`: from a window of samples, how many sequences each one decoded beside
  and how many other models of its device were busy meanwhile (time-averaged);
* :class:`FitStore` and :func:`fit_service`: per model, a bounded reservoir stratified by load
  and a robust (Huber) weighted regression of the time to first token on the prompt length and
  of the log of the per-token decode time on busy slots and device co-load (each multiplies
  it);
* :func:`apply_decision`: applies a decision to the router and its kernel table (on the event
  loop; the table has one owner).
"""

from __future__ import annotations

import importlib
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ._config import CalibrationSettings
from ._exceptions import ConfigError
from ._request import CompletionResult, EmbeddingResult, Request
from ._router import Router
from ._snapshot import SchedulerSnapshot
from ._types import ModelSpec
from .telemetry._recorder import RecorderSnapshot

__all__ = [
    "CALIBRATORS",
    "CalibrationDecision",
    "CalibrationReport",
    "CalibrationView",
    "Calibrator",
    "FitStore",
    "Loaded",
    "Sample",
    "SampleLog",
    "ServiceFit",
    "apply_decision",
    "concurrency",
    "fit_service",
    "load_calibrator",
]

#: Calibrator name -> "module:factory(settings, models)". The module is imported on first use
#: (the default replays in ``zeta.sim``, which sits above the scheduler).
CALIBRATORS: dict[str, str] = {"feedback": "zeta.sim._calibrate:feedback_calibrator"}

#: The largest step-slope and co-load a fit may report (the kernel's own bounds).
MAX_FIT_SLOPE = 10.0
MAX_FIT_CO_SLOW = 10.0
#: Samples kept per (model, busy stratum, co-load stratum) in a :class:`FitStore`.
STRATUM_SAMPLES = 32
#: Busy-slot strata: 1, 2, 3-4, 5-8, ... (by ``ceil(log2(busy))``), co-load strata 0, 1, 2+.
BUSY_STRATA = 9
COLOAD_STRATA = 3
#: The least weight of an old sample in a fit (so rare load regimes are not forgotten).
MIN_WEIGHT = 0.05
#: The fewest samples of a kind of fit (first token, decode) before it is trusted.
MIN_FIT_SAMPLES = 8


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished request (seconds on the scheduler's clock).

    Attributes:
        model: the model that served it.
        kind: its kind's column in the kernel (:data:`~zeta._types.KIND_INDEX`).
        at: arrival (the call entered the scheduler).
        started: its service began (a slot took it).
        first: its first token (for an embedding: its end).
        end: its result.
        prompt_tokens, output_tokens: sizes; ``output_tokens`` is 0 for an embedding.
        max_tokens: what the caller asked for (the router's length estimate).
        priority: its priority class (an int of :class:`~zeta.Priority`).
        difficulty: the classifier's hint in ``[0, 1]``.
        spilled: served by a model that does not prefer its kind.
    """

    model: str
    kind: int
    at: float
    started: float
    first: float
    end: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    priority: int = 1
    difficulty: float = 0.5
    spilled: bool = False

    @property
    def latency(self) -> float:
        return self.end - self.at


def sample_of(request: Request) -> Sample | None:
    """What the calibrator keeps of a successful request (``None`` if it never started or its
    timings are not finite)."""
    result, started, model = request.result, request.started_at, request.model
    if started is None or model is None:
        return None
    route = request.route
    if isinstance(result, CompletionResult):
        first = started + result.first_token_s
        output, max_tokens = result.completion_tokens, max(int(route.est_tokens), 0)
    elif isinstance(result, EmbeddingResult):
        first = started + result.service_s
        output, max_tokens = 0, 0
    else:
        return None
    end = started + result.service_s
    if not all(math.isfinite(v) for v in (first, end, request.created_at)):
        return None
    return Sample(
        model=model,
        kind=route.kind_index,
        at=request.created_at,
        started=started,
        first=first,
        end=end,
        prompt_tokens=result.prompt_tokens,
        output_tokens=output,
        max_tokens=max(max_tokens, output),
        priority=int(route.priority),
        difficulty=route.difficulty,
        spilled=request.preferred is not None and model != request.preferred,
    )


class SampleLog:
    """The most recent ``capacity`` finished requests (a ring; written on the event loop)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._ring: deque[Sample] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._ring.maxlen or 0

    def add(self, sample: Sample) -> None:
        self._ring.append(sample)

    def __len__(self) -> int:
        return len(self._ring)

    def since(self, start: float) -> list[Sample]:
        """A copy of the samples that arrived at ``start`` or later, in finishing order."""
        return [s for s in self._ring if s.at >= start]


@dataclass(frozen=True, slots=True)
class ServiceFit:
    """One model's service model, fitted from its history.

    ``call_s + prefill_token_s * prompt`` to the first token; per output token with ``busy``
    sequences decoding and ``others`` other busy models on its device:
    ``token_s * (1 + step_slope * (busy - 1)) * (1 + co_slow * others)``.
    ``samples``: how many samples the fit used.
    """

    model: str
    call_s: float
    prefill_token_s: float
    token_s: float
    step_slope: float
    co_slow: float
    samples: int
    typical_prompt: float = 64.0

    def first_token_s(self, prompt_tokens: float | None = None) -> float:
        p = self.typical_prompt if prompt_tokens is None else prompt_tokens
        return self.call_s + self.prefill_token_s * p

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "model": self.model,
            "call_s": self.call_s,
            "prefill_token_s": self.prefill_token_s,
            "token_s": self.token_s,
            "step_slope": self.step_slope,
            "co_slow": self.co_slow,
            "samples": self.samples,
        }


#: The coefficients a fit exposes (gauges, the report), by name.
FIT_COEFFICIENTS = ("call_s", "prefill_token_s", "token_s", "step_slope", "co_slow")


@dataclass(frozen=True, slots=True)
class CalibrationDecision:
    """What one run of a calibrator decided.

    Attributes:
        params: new values of some :class:`~zeta.Scoring` fields (empty: none).
        fits: refitted service models, per model.
        feed: whether :func:`apply_decision` feeds ``fits`` into the kernel's estimates
            (otherwise they are only reported).
        action: ``"applied"`` (a tuned change), ``"rejected"`` (no candidate beat the current
            parameters by the margin), ``"rolled_back"`` (the guard restored the last good
            parameters), ``"skipped"`` (too few requests, or a change still in flight) or
            ``"failed"`` (the run raised; nothing changed).
        objective: the live objective of the window, seconds (NaN if unknown).
        predicted_before: the replayed objective of the current parameters on the window.
        predicted_after: the replayed objective of what is applied (the current one when
            nothing is).
        requests: finished requests in the window.
        detail: anything else worth logging (the candidates' objectives, the guard's numbers).
    """

    params: Mapping[str, float] = field(default_factory=dict)
    fits: Mapping[str, ServiceFit] = field(default_factory=dict)
    feed: bool = True
    action: str = "skipped"
    objective: float = math.nan
    predicted_before: float = math.nan
    predicted_after: float = math.nan
    requests: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)


class CalibrationReport(dict[str, float]):
    """The parameters one calibration run changed (a plain mapping of name to new value, empty
    when none), with the run's details as attributes: ``run``, ``action``, ``objective``,
    ``predicted_before``, ``predicted_after``, ``requests``, ``params`` (all parameters in force
    afterwards), ``fits`` and ``detail``. ``await zs.calibrate()`` returns one; the
    ``calibration_finished`` log event carries the same fields."""

    run: int
    action: str
    objective: float
    predicted_before: float
    predicted_after: float
    requests: int
    params: dict[str, float]
    fits: dict[str, ServiceFit]
    detail: dict[str, Any]

    def __init__(
        self,
        changed: Mapping[str, float],
        *,
        run: int,
        params: Mapping[str, float],
        decision: CalibrationDecision | None = None,
    ) -> None:
        super().__init__(changed)
        d = (
            decision
            if decision is not None
            else CalibrationDecision(action="applied" if changed else "rejected")
        )
        self.run = run
        self.action = d.action
        self.objective = d.objective
        self.predicted_before = d.predicted_before
        self.predicted_after = d.predicted_after
        self.requests = d.requests
        self.params = dict(params)
        self.fits = dict(d.fits)
        self.detail = dict(d.detail)

    def log_fields(self) -> dict[str, Any]:
        """The fields of the ``calibration_finished`` event."""
        return {
            "run": self.run,
            "action": self.action,
            "changed": dict(self),
            "requests": self.requests,
            "objective_s": _clean(self.objective),
            "predicted_before_s": _clean(self.predicted_before),
            "predicted_after_s": _clean(self.predicted_after),
            "params": self.params,
            "fits": {name: f.to_dict() for name, f in sorted(self.fits.items())},
        }


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class CalibrationView:
    """Everything a calibration run gets.

    Attributes:
        snapshot: every actor's state now.
        history: everything the recorder has counted since the scheduler started.
        params: the current values of the tunable parameters.
        run: how many calibration runs happened before this one.
        samples: the finished requests of the log (oldest first), a copy.
        models: the configured models.
        now: the scheduler's clock.
    """

    snapshot: SchedulerSnapshot
    history: RecorderSnapshot
    params: Mapping[str, float]
    run: int
    samples: Sequence[Sample] = ()
    models: Sequence[ModelSpec] = ()
    now: float = 0.0


class Calibrator(Protocol):
    """Proposes parameter values from a :class:`CalibrationView`.

    ``calibrate`` runs on the event loop: a calibrator that computes for long should move the work
    to a thread itself (``await anyio.to_thread.run_sync(...)``). Returning a mapping applies it
    (unknown keys or invalid values reject the whole run); returning a
    :class:`CalibrationDecision` applies its ``params`` and feeds its ``fits`` to the kernel;
    returning ``None`` changes nothing. An exception is logged and the next run happens on
    schedule.
    """

    async def calibrate(
        self, view: CalibrationView
    ) -> Mapping[str, float] | CalibrationDecision | None: ...


def load_calibrator(
    name: str, settings: CalibrationSettings, models: Sequence[ModelSpec]
) -> Calibrator:
    """The calibrator ``name`` (see :data:`CALIBRATORS`), built for ``models``.

    Raises:
        ConfigError: an unknown name.
    """
    try:
        target = CALIBRATORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown calibrator {name!r}; known: {sorted(CALIBRATORS)}", key="calibrator"
        ) from None
    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    calibrator: Calibrator = factory(settings, models)
    return calibrator


def apply_decision(
    router: Router, decision: CalibrationDecision | Mapping[str, float] | None, now: float
) -> dict[str, float]:
    """Apply a calibrator's answer: parameters through :meth:`Router.apply` (validated, all or
    nothing), then each fit into the kernel rows of its model (step slope, and one observation
    of its typical request at one sequence, which the peak EWMA folds in). Returns the
    parameters changed, at their applied values.

    Raises:
        ConfigError: an unknown parameter or an invalid value (nothing was changed).
    """
    if decision is None:
        return {}
    if isinstance(decision, CalibrationDecision):
        params, fits = decision.params, decision.fits if decision.feed else {}
    else:
        params, fits = decision, {}
    changed: dict[str, float] = {}
    if params:
        scoring = router.apply(params)
        changed = {k: getattr(scoring, k) for k in params}
    table = router.table
    for name, fit in fits.items():
        for i in router.rows.get(name, ()):
            if math.isfinite(fit.step_slope) and fit.step_slope >= 0.0:
                table.set_step_slope(i, min(fit.step_slope, MAX_FIT_SLOPE))
            values = (fit.first_token_s(), fit.token_s)
            if all(math.isfinite(v) and v >= 0.0 for v in values):
                table.observe(i, fit.first_token_s(), fit.token_s, max(0.0, now), 1)
    return changed


# -- load of each sample ------------------------------------------------------------------------
def _integral(
    starts: npt.NDArray[np.float64], ends: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Breakpoints and the cumulative integral of ``#{intervals covering t}`` at them."""
    times = np.concatenate([starts, ends])
    steps = np.concatenate([np.ones(starts.size), -np.ones(ends.size)])
    order = np.argsort(times, kind="stable")
    times, steps = times[order], steps[order]
    level = np.cumsum(steps)
    cum = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])
    return times, cum


def _union(
    starts: npt.NDArray[np.float64], ends: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Breakpoints and the cumulative integral of ``1[some interval covers t]``."""
    order = np.argsort(starts, kind="stable")
    merged: list[tuple[float, float]] = []
    for a, b in zip(starts[order].tolist(), ends[order].tolist(), strict=True):
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    s = np.array([m[0] for m in merged])
    e = np.array([m[1] for m in merged])
    return _integral(s, e)


def _mean_over(
    curve: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
    a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    times, cum = curve
    if times.size == 0:
        return np.zeros(a.size)
    span = b - a
    fa = np.interp(a, times, cum)
    fb = np.interp(b, times, cum)
    out = np.where(span > 1e-12, (fb - fa) / np.where(span > 1e-12, span, 1.0), 0.0)
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Loaded:
    """A sample with the load it met (see :func:`concurrency`).

    ``busy``: mean sequences decoding on its model while it decoded (itself included, >= 1);
    ``others``: mean other busy models on its device meanwhile; ``ttft``: its first-token time
    from when its own prefill could start (after the prefills admitted before it); ``decode``:
    its decode time less the time the other requests' prefills held up its model's steps.
    """

    sample: Sample
    busy: float
    others: float
    ttft: float
    decode: float


def concurrency(samples: Sequence[Sample], devices: Mapping[str, object]) -> list[Loaded]:
    """The load each sample met, from the samples' own intervals (a request still running is
    not seen), in ``O(n log n)`` per model. ``devices``: model name -> device key (a model not
    named is alone on its device)."""
    n = len(samples)
    if n == 0:
        return []
    models = np.array([s.model for s in samples])
    started = np.array([s.started for s in samples])
    first = np.array([s.first for s in samples])
    end = np.array([s.end for s in samples])
    busy = np.ones(n)
    others = np.zeros(n)
    ttft = np.maximum(0.0, first - started)
    decode = np.maximum(0.0, end - first)
    names = sorted(set(models.tolist()))
    running = {}
    for name in names:
        mask = models == name
        running[name] = _union(started[mask], end[mask])
    for name in names:
        idx = np.flatnonzero(models == name)
        a, b = first[idx], end[idx]
        busy[idx] = np.maximum(1.0, _mean_over(_integral(a, b), a, b))
        # Prefills run one after another: one starts when those admitted before it are done.
        order = idx[np.argsort(started[idx], kind="stable")]
        ahead = np.maximum.accumulate(np.concatenate([[-np.inf], first[order][:-1]]))
        eff = np.maximum(started[order], ahead)
        ttft[order] = np.maximum(0.0, first[order] - eff)
        pre = _union(eff, first[order])
        span = np.maximum(0.0, b - a)
        stalled = _mean_over(pre, a, b) * span
        decode[idx] = np.maximum(0.1 * span, span - stalled)
        dev = devices.get(name, name)
        acc = np.zeros(idx.size)
        for other in names:
            if other != name and devices.get(other, other) == dev:
                acc += _mean_over(running[other], a, b)
        others[idx] = acc
    return [
        Loaded(s, float(busy[i]), float(others[i]), float(ttft[i]), float(decode[i]))
        for i, s in enumerate(samples)
    ]


# -- robust regression ----------------------------------------------------------------------------
def _huber(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], w: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Weighted least squares of ``y`` on the columns of ``x`` with Huber reweighting (a few
    iterations; residuals beyond 1.345 robust scales weigh less)."""
    coef = np.zeros(x.shape[1])
    weights = w.copy()
    for _ in range(6):
        sw = np.sqrt(weights)
        xs = x * sw[:, None]
        ys = y * sw
        # A tiny ridge keeps a column without variance (every sample at one load) finite.
        gram = xs.T @ xs + 1e-12 * np.eye(x.shape[1])
        coef = np.asarray(np.linalg.solve(gram, xs.T @ ys), dtype=np.float64)
        r = y - x @ coef
        scale = 1.4826 * float(np.median(np.abs(r - np.median(r)))) + 1e-12
        u = np.abs(r) / (1.345 * scale)
        weights = w * np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
    return np.asarray(coef, dtype=np.float64)


def fit_service(
    model: str,
    samples: Sequence[Loaded],
    now: float,
    half_life: float,
) -> ServiceFit | None:
    """Fit ``model``'s service model from its loaded samples; ``None`` with too few samples. Older samples weigh less (half-life ``half_life`` seconds, never below
    :data:`MIN_WEIGHT`), residuals far from the fit weigh less (Huber)."""
    if len(samples) < MIN_FIT_SAMPLES:
        return None
    age = np.array([now - x.sample.end for x in samples])
    w = np.maximum(MIN_WEIGHT, 0.5 ** (np.maximum(age, 0.0) / max(half_life, 1e-9)))
    prompt = np.array([float(x.sample.prompt_tokens) for x in samples])
    ttft = np.array([x.ttft for x in samples])
    x1 = np.column_stack([np.ones(prompt.size), prompt])
    if float(np.ptp(prompt)) > 0.0:
        call, prefill = (float(c) for c in _huber(x1, ttft, w))
        if prefill < 0.0:
            call, prefill = float(np.average(ttft, weights=w)), 0.0
        if call < 0.0:
            call, prefill = 0.0, float(np.average(ttft / np.maximum(prompt, 1.0), weights=w))
    else:
        call, prefill = float(np.average(ttft, weights=w)), 0.0
    keep = [i for i, x in enumerate(samples) if x.sample.output_tokens >= 2 and x.decode > 0.0]
    token_s, slope, co = math.nan, math.nan, math.nan
    if len(keep) >= MIN_FIT_SAMPLES:
        dec = [samples[i] for i in keep]
        wd = w[keep]
        per_token = np.array([x.decode / x.sample.output_tokens for x in dec])
        b = np.array([x.busy - 1.0 for x in dec])
        o = np.array([x.others for x in dec])
        cols = [np.ones(b.size)]
        use_b = float(np.ptp(b)) > 0.25
        use_o = float(np.ptp(o)) > 0.25
        if use_b:
            cols.append(b)
        if use_o:
            cols.append(o)
        # Fitted in log space: each busy slot and each other busy model multiplies the time
        # per token. Effects come out as ratios directly; a linear fit's ratios divide by an
        # intercept extrapolated to one slot and no co-load, which samples taken under load
        # (a surge) leave so uncertain that the ratios blew up (a co-load of 8x from 31
        # samples).
        coef = _huber(np.column_stack(cols), np.log(np.maximum(per_token, 1e-12)), wd)
        token_s = max(math.exp(float(coef[0])), 1e-9)
        slope = math.expm1(float(coef[1])) if use_b else math.nan
        co = math.expm1(float(coef[-1])) if use_o else math.nan
        slope = min(max(slope, 0.0), MAX_FIT_SLOPE) if math.isfinite(slope) else math.nan
        co = min(max(co, 0.0), MAX_FIT_CO_SLOW) if math.isfinite(co) else math.nan
    recent = [x.sample.prompt_tokens for x in samples[-256:]]
    return ServiceFit(
        model=model,
        call_s=max(0.0, call),
        prefill_token_s=max(0.0, prefill),
        token_s=token_s,
        step_slope=slope,
        co_slow=co,
        samples=len(samples),
        typical_prompt=float(np.median(recent)) if recent else 64.0,
    )


class FitStore:
    """Per model, the last :data:`STRATUM_SAMPLES` samples of each load stratum (busy slots
    ``1, 2, 3-4, 5-8, ...`` x other busy models ``0, 1, 2+``): at most
    ``STRATUM_SAMPLES * BUSY_STRATA * COLOAD_STRATA`` (864) samples a model, whatever the
    traffic, and a load seen once stays until that stratum sees newer samples."""

    def __init__(self, per_stratum: int = STRATUM_SAMPLES) -> None:
        self._per = per_stratum
        self._strata: dict[tuple[str, int, int], deque[Loaded]] = {}

    def add(self, items: Iterable[Loaded]) -> None:
        for item in items:
            b = min(BUSY_STRATA - 1, max(0, math.ceil(math.log2(max(1.0, item.busy)))))
            o = min(COLOAD_STRATA - 1, max(0, round(item.others)))
            key = (item.sample.model, b, o)
            box = self._strata.get(key)
            if box is None:
                box = self._strata[key] = deque(maxlen=self._per)
            box.append(item)

    def of(self, model: str) -> list[Loaded]:
        """Every stored sample of ``model``, oldest end first."""
        out = [item for key, box in self._strata.items() if key[0] == model for item in box]
        out.sort(key=lambda item: item.sample.end)
        return out

    def models(self) -> list[str]:
        return sorted({key[0] for key in self._strata})

    def __len__(self) -> int:
        return sum(len(box) for box in self._strata.values())
