"""The feedback calibrator: bounded steps, exact rollback, the refit, config, and a live run."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeta import ConfigError, Scheduler
from zeta._calibration import CalibrationReport, Loaded, Sample, concurrency, fit_service
from zeta._config import CalibrationSettings, parse_config
from zeta._types import SCORING_FIELDS, ModelSpec, Scoring
from zeta.sim import ladder_fleet, scenario
from zeta.sim._calibrate import (
    BOUNDS,
    FeedbackCalibrator,
    Slowdown,
    bounds_of,
    simulate_calibrated,
)

FLEET = ladder_fleet()


def _calibrator(**kw: Any) -> FeedbackCalibrator:
    return FeedbackCalibrator(
        CalibrationSettings(interval_s=15.0, **kw), FLEET.specs, lanes=FLEET.lanes
    )


def _in_bounds(params: dict[str, float]) -> st.SearchStrategy[dict[str, float]]:
    return st.fixed_dictionaries({name: st.floats(*bounds_of(name)) for name in SCORING_FIELDS})


# -- bounds ---------------------------------------------------------------------------------------
@given(params=_in_bounds({}), rotations=st.integers(0, 12), step=st.floats(0.01, 0.25))
@settings(max_examples=200, deadline=None)
def test_no_candidate_leaves_its_bounds_or_steps_more_than_the_bound(
    params: dict[str, float], rotations: int, step: float
) -> None:
    cal = _calibrator(max_step=step, candidates=24)
    for _ in range(rotations):
        cal.candidates(params)
    for cand in cal.candidates(params):
        moved = [k for k in cand if cand[k] != params[k]]
        assert len(moved) == 1
        for k, v in cand.items():
            lo, hi = bounds_of(k)
            assert lo <= v <= hi
            assert abs(v - params[k]) <= step * abs(params[k]) * (1 + 1e-12)
        Scoring(**cand)  # always a valid parameter set


@given(value=st.floats(0.0, 1e6))
def test_a_parameter_set_outside_its_bounds_is_left_alone(value: float) -> None:
    lo, hi = BOUNDS["spill_penalty"]
    params = {**Scoring().as_dict(), "spill_penalty": value}
    cands = _calibrator(candidates=24).candidates(params)
    if not lo <= value <= hi:
        assert all(c["spill_penalty"] == value for c in cands)


# -- the core in virtual time ---------------------------------------------------------------------
def _run(cal: FeedbackCalibrator, name: str = "steady", scale: float = 0.35, **kw: Any) -> Any:
    workload = scenario(name, FLEET, 0, scale=scale)
    return simulate_calibrated(FLEET, workload, calibrator=cal, interval=15.0, **kw)


def test_every_applied_step_is_bounded_and_stays_in_bounds() -> None:
    cal = _calibrator()
    r = _run(cal)
    assert r.runs
    before = Scoring().as_dict()
    for _, params, decision in r.runs:
        assert decision.action in {"applied", "rejected", "rolled_back", "skipped", "failed"}
        if decision.action == "applied":
            for k, v in decision.params.items():
                assert abs(v - before[k]) <= 0.25 * before[k] * (1 + 1e-12)
                lo, hi = bounds_of(k)
                assert lo <= v <= hi
        before = params


def test_a_bad_proposal_is_rolled_back_to_the_exact_previous_values() -> None:
    cal = _calibrator()
    original = cal.step
    n = {"runs": 0}

    def step(*args: Any, **kwargs: Any) -> Any:
        n["runs"] += 1
        if n["runs"] == 3:  # in the first surge: spilling nothing is bad there
            cal.inject({"spill_penalty": 30.0, "quality_penalty": 10.0})
        return original(*args, **kwargs)

    cal.step = step  # type: ignore[method-assign]
    r = _run(cal, "surge", scale=1.0)
    injected = next(i for i, (_, _, d) in enumerate(r.runs) if d.detail.get("injected"))
    assert r.runs[injected + 1][2].action == "rolled_back"
    assert r.runs[injected + 1][1] == r.runs[injected - 1][1]  # exactly the previous values
    assert cal.counts["rolled_back"] >= 1


def test_a_failing_run_restores_the_last_good_parameters() -> None:
    cal = _calibrator(min_requests=1)
    good = Scoring().as_dict()
    cal.inject({"tau": 9.0})
    samples = _samples()
    first = cal.safe_step(samples, good, 100.0)
    assert first.action == "applied" and cal.pending is not None

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("calibration bug")

    cal.step = boom  # type: ignore[method-assign]
    failed = cal.safe_step(samples, {**good, "tau": 9.0}, 130.0)
    assert failed.action == "failed" and dict(failed.params) == good
    assert cal.pending is None and cal.counts["failed"] == 1


def _samples(n: int = 200, slow: float = 1.0) -> list[Sample]:
    out = []
    for i in range(n):
        at = i * 0.5
        prompt = 10 + (i * 7) % 90
        first = at + 0.002 + 0.0004 * prompt
        end = first + 20 * 0.003 * slow
        out.append(Sample("coder", 1, at, at, first, end, prompt, 20, 32))
    return out


def test_the_refit_recovers_an_isolated_model_s_service_times() -> None:
    loaded = concurrency(_samples(), {"coder": None})
    fit = fit_service("coder", loaded, 100.0, 60.0)
    assert fit is not None
    assert fit.call_s == pytest.approx(0.002, rel=0.05)
    assert fit.prefill_token_s == pytest.approx(0.0004, rel=0.05)
    assert fit.token_s == pytest.approx(0.003, rel=0.05)


def test_the_refit_of_samples_taken_only_under_load_keeps_its_ratios_sane() -> None:
    # A surge: every sample decoded beside 2-4 others and 1-2 busy models, never alone, with a
    # 10% jitter. The one-slot, no-co-load time is an extrapolation; the fit must still land
    # near it and read each effect as the ratio it is.
    token, slope, co = 0.014, 0.1, 0.3
    loaded = []
    for i in range(40):
        busy, others = 3.0 + (i % 3) - 1.0, 1.0 + (i % 2)
        jitter = 1.0 + 0.1 * math.sin(i * 1.7)
        per_token = token * (1 + slope) ** (busy - 1) * (1 + co) ** others * jitter
        sample = Sample("reasoner", 3, i, i, i + 0.1, i + 0.1 + 48 * per_token, 60, 48, 64)
        loaded.append(Loaded(sample, busy, others, 0.1, 48 * per_token))
    fit = fit_service("reasoner", loaded, 40.0, 60.0)
    assert fit is not None
    assert fit.token_s == pytest.approx(token, rel=0.25)
    assert fit.step_slope == pytest.approx(slope, abs=0.1)
    assert fit.co_slow == pytest.approx(co, abs=0.15)


def test_the_refit_sees_a_model_slow_down() -> None:
    cal = _calibrator(min_requests=1)
    cal.step(_samples(), Scoring().as_dict(), 100.0)
    fast = cal.fits["coder"].token_s
    late = [
        Sample(s.model, s.kind, s.at + 200, s.started + 200, s.first + 200, s.end + 200 +
               20 * 0.006, s.prompt_tokens, s.output_tokens, s.max_tokens)
        for s in _samples()
    ]  # fmt: skip
    cal.step(late, Scoring().as_dict(), 400.0)
    assert cal.fits["coder"].token_s > 2.0 * fast


def test_runs_in_virtual_time_refit_after_a_slowdown() -> None:
    # Fed to the kernel, the fit keeps some reasoning on the slowed reasoner, so it keeps seeing
    # samples (unfed, the EWMAs move that work away and the fit has nothing new to see).
    cal = _calibrator(feed=True)
    workload = scenario("calm", FLEET, 0)
    half = workload[-1].at / 2
    r = simulate_calibrated(
        FLEET, workload, calibrator=cal, interval=15.0, slowdowns=[Slowdown(half, "reasoner", 3.0)]
    )
    before = [d.fits["reasoner"].token_s for t, _, d in r.runs if t < half and "reasoner" in d.fits]
    after = [d.fits["reasoner"].token_s for t, _, d in r.runs if t > half + 30 and "reasoner"
             in d.fits]  # fmt: skip
    assert before and after and after[-1] > 1.5 * before[-1]


# -- config ---------------------------------------------------------------------------------------
MODELS = [{"name": "m", "backend": "simulated"}]


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"interval_s": 0}, "calibration.interval_s", "must be a finite number > 0"),
        ({"max_step": 0.5}, "calibration.max_step", "<= 0.25"),
        ({"objective": "p42"}, "calibration.objective", "must be one of"),
        ({"tune": ["tau", "nope"]}, "calibration.tune", "unknown parameter 'nope'"),
        ({"tune": "tau"}, "calibration.tune", "must be an array"),
        ({"enabled": "yes"}, "calibration.enabled", "must be true or false"),
        ({"margin": 1.0}, "calibration.margin", "must be below 1"),
        ({"candidates": 0}, "calibration.candidates", "between 1 and 24"),
        ({"intervall_s": 1}, "calibration.intervall_s", "did you mean 'interval_s'"),
    ],
)
def test_calibration_config_errors_name_the_key(
    table: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"calibration": table, "models": MODELS})
    assert info.value.key == key
    assert message in info.value.message


def test_calibration_config_reaches_the_scheduler() -> None:
    config = parse_config({"calibration": {"interval_s": 5, "objective": "p99"}, "models": MODELS})
    assert config.calibration == CalibrationSettings(interval_s=5.0, objective="p99")
    zs = Scheduler(**config.scheduler_kwargs())
    assert isinstance(zs.calibrator, FeedbackCalibrator)
    off = parse_config({"calibration": {"enabled": False}, "models": MODELS})
    assert Scheduler(**off.scheduler_kwargs()).calibrator is None
    assert parse_config({"models": MODELS}).calibration is None
    with pytest.raises(ConfigError, match="unknown calibrator"):
        Scheduler([ModelSpec("m", backend="simulated")], calibrator="nope")


# -- live, on the simulated backend ----------------------------------------------------------------
@pytest.mark.anyio
async def test_live_calibration_reacts_when_a_model_slows_down() -> None:
    opts = {"base_s": 0.0005, "per_prompt_token_s": 0.00001, "per_output_token_s": 0.0002}
    models = [
        ModelSpec("a", kinds=["simple", "code"], backend="simulated", options=opts),
        ModelSpec("b", kinds=["simple", "code"], preferred=["code"], backend="simulated",
                  options=opts),
    ]  # fmt: skip
    cal_settings = CalibrationSettings(interval_s=1e5, min_requests=5)
    async with Scheduler(models, calibration=cal_settings, sampler=_NoSampler()) as zs:
        cal = zs.calibrator
        assert isinstance(cal, FeedbackCalibrator)
        for _ in range(30):
            await zs.complete("x", kind="simple", max_tokens=4, model="a")
        first = await zs.calibrate()
        assert isinstance(first, CalibrationReport) and first.requests >= 5
        assert "a" in first.fits
        fast = first.fits["a"].token_s
        for actor in zs._actors:  # "a" slows down 10x, as when another tenant takes its device
            if actor.name == "a":
                actor.backend.per_output_token_s *= 10  # type: ignore[attr-defined]
        for _ in range(30):
            await zs.complete("x", kind="simple", max_tokens=4, model="a")
        second = await zs.calibrate()
        assert second.fits["a"].token_s > 3 * fast  # the refit saw the slowdown
        state = zs.calibration_state()
        assert state is not None and state.fits["a"].token_s == second.fits["a"].token_s
        assert second.run == 2 and set(second.params) == set(SCORING_FIELDS)
        assert math.isfinite(second.objective)


class _NoSampler:
    def sample(self, actors: Any, now: float) -> list[float]:
        return [0.0 for _ in actors]
