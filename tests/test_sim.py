"""The virtual-time simulator: exact service times in small cases, contention, determinism,
exactly-once accounting, the oracle, scenario loads and the quality measure."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zeta import ConfigError, Kind, Priority
from zeta._policies import Candidate, RouteRequest
from zeta._scoring import ScoreTable
from zeta.sim import (
    SCENARIOS,
    Capacity,
    Fleet,
    Interval,
    OraclePolicy,
    SimRequest,
    gpu_fleet,
    ladder_fleet,
    load_fleet,
    scenario,
    simulate,
    surge_loads,
)

CODE, REASON, EMBED = Kind.CODE, Kind.REASON, Kind.EMBED


def fleet(*models: dict[str, Any], lanes: float = 2.0) -> Fleet:
    """Models with exact, jitter-free profiles: 10 ms per call, 1 ms per prompt token, a step of
    10 ms with one sequence and 15 ms with two (unless a model says otherwise)."""
    base = {"call_s": 0.01, "prefill_token_s": 0.001, "step_s": [0.01, 0.015]}
    return Fleet.from_dict(
        {"devices": {"cpu": {"lanes": lanes}}, "models": [{**base, **m} for m in models]}
    )


def req(at: float, kind: Kind = CODE, prompt: int = 10, output: int = 5) -> SimRequest:
    if kind is EMBED:
        output = 0
    return SimRequest(at, kind, prompt, output, output)


CODER = {"name": "coder", "kinds": ["code", "simple"], "preferred": ["code", "simple"]}
REASONER = {"name": "reasoner", "kinds": ["reason"], "preferred": ["reason"]}


# -- service times -------------------------------------------------------------------------------
def test_one_request_takes_its_modelled_time() -> None:
    r = simulate(fleet(CODER), [req(1.0)], "static")
    # 10 ms call + 10 prompt tokens at 1 ms, then 5 steps of 10 ms.
    assert r.latency[0] == pytest.approx(0.07)
    assert r.first_token[0] == pytest.approx(0.02)
    assert r.model[0] == 0 and r.refused == 0


def test_a_batch_prefills_in_turn_then_decodes_at_the_step_time_of_its_occupancy() -> None:
    r = simulate(fleet(CODER), [req(0.0), req(0.0)], "static")
    # Two prefills of 20 ms one after the other (the first sequence waits), then 5 steps at
    # the two-sequence step time of 15 ms.
    assert r.first_token.tolist() == pytest.approx([0.02, 0.04])
    assert r.latency.tolist() == pytest.approx([0.115, 0.115])


def test_with_one_slot_requests_run_one_after_another() -> None:
    r = simulate(fleet({**CODER, "step_s": [0.01]}), [req(0.0), req(0.0)], "static")
    assert r.latency.tolist() == pytest.approx([0.07, 0.14])


def test_an_embedding_is_a_prefill_with_nothing_to_decode() -> None:
    f = fleet({"name": "embedder", "kinds": ["embed"], "preferred": ["embed"]})
    r = simulate(f, [req(0.0, EMBED, prompt=30)], "static")
    assert r.latency[0] == pytest.approx(0.04)


# -- contention ----------------------------------------------------------------------------------
def test_models_busy_together_on_one_device_slow_each_other_down() -> None:
    shared = fleet({**CODER, "coload": [1.0, 1.5]}, {**REASONER, "coload": [1.0, 1.5]})
    apart = fleet({**CODER, "coload": [1.0, 1.5]}, {**REASONER, "coload": [1.0, 1.5], "device": 0})
    work = [req(0.0, CODE), req(0.0, REASON)]
    assert simulate(apart, work, "static").latency.tolist() == pytest.approx([0.07, 0.07])
    assert simulate(shared, work, "static").latency.tolist() == pytest.approx([0.105, 0.105])


def test_contention_lasts_only_while_both_are_busy() -> None:
    shared = fleet({**CODER, "coload": [1.0, 1.5]}, {**REASONER, "coload": [1.0, 1.5]})
    r = simulate(shared, [req(0.0, CODE), req(0.03, REASON)], "static")
    # The coder runs alone until 30 ms (prefill, one step), then 4 steps at 15 ms with the
    # reasoner busy: it ends at 90 ms. The reasoner prefills 30 ms slowed down, decodes two
    # steps at 15 ms until the coder ends, then three at 10 ms alone: it ends at 120 ms.
    assert r.latency.tolist() == pytest.approx([0.09, 0.09])


def test_contention_slows_a_co_busy_model_in_a_scenario() -> None:
    base = ladder_fleet()
    alone = Fleet(base.models, {None: 2.0})
    no_coload = Fleet.from_dict(
        {
            **alone.to_dict(),
            "models": [{**m, "coload": [1.0]} for m in alone.to_dict()["models"]],
        }
    )
    work = scenario("steady", base, seed=1, requests=1500)
    slow = simulate(base, work, "static", seed=1).summary().latency.mean_s
    fast = simulate(no_coload, work, "static", seed=1).summary().latency.mean_s
    assert slow > 1.1 * fast


# -- determinism and accounting --------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["dynamic", "p2c", "threshold", "oracle"])
def test_a_run_is_deterministic_per_seed(policy: str) -> None:
    f = ladder_fleet()
    work = scenario("bursty", f, seed=3, requests=1200)
    assert work == scenario("bursty", f, seed=3, requests=1200)
    a, b = (simulate(f, work, policy, seed=3) for _ in range(2))
    for name in ("latency", "first_token", "model", "quality"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    c = simulate(f, work, policy, seed=4)
    assert not np.array_equal(a.latency, c.latency, equal_nan=True)
    assert scenario("bursty", f, seed=4, requests=1200) != work


@pytest.mark.parametrize("timeout", [0.0, 0.05, None])
@pytest.mark.parametrize("policy", ["static", "dynamic", "jsq", "oracle"])
def test_every_request_completes_or_is_refused_exactly_once(
    timeout: float | None, policy: str
) -> None:
    f = ladder_fleet()
    work = scenario("overwhelm", f, seed=2, requests=1500)
    r = simulate(f, work, policy, seed=2, mailbox_capacity=2, admission_timeout=timeout)
    served = r.model >= 0
    assert r.requests == len(work)
    assert np.isfinite(r.latency[served]).all() and (r.latency[served] > 0).all()
    assert np.isnan(r.latency[~served]).all()
    s = r.summary()
    assert s.served + s.refused == len(work)
    assert sum(s.by_model.values()) == s.served
    if timeout is None:
        assert s.refused == 0
    else:
        assert s.refused > 0
    # (The engine also raises if any request ended other than once.)


ALL = {"name": "m", "kinds": ["simple", "code", "reason"], "step_s": [0.01]}


def test_waiting_requests_are_placed_oldest_first_across_kinds() -> None:
    # One slot, a mailbox of one: the first request runs, the second queues, the rest wait in
    # their kinds' lines. Each freed slot takes the oldest waiter, whatever its kind: the lines
    # used to be served in kind order (simple, code, embed, reason), which starved reasoning
    # for as long as a surge of the others kept the mailboxes full.
    kinds = [CODE, CODE, REASON, CODE, Kind.SIMPLE, REASON]
    work = [req(0.001 * n, kind) for n, kind in enumerate(kinds)]
    r = simulate(fleet(ALL), work, "static", mailbox_capacity=1)
    finish = r.at + r.latency
    assert np.argsort(finish).tolist() == list(range(len(work)))


def test_waiting_requests_are_placed_by_priority_then_age() -> None:
    def at(t: float, kind: Kind, priority: Priority) -> SimRequest:
        return SimRequest(t, kind, 10, 5, 5, priority)

    work = [
        at(0.000, CODE, Priority.NORMAL),  # runs
        at(0.001, CODE, Priority.NORMAL),  # queues
        at(0.002, REASON, Priority.LOW),
        at(0.003, CODE, Priority.NORMAL),
        at(0.004, Kind.SIMPLE, Priority.HIGH),
        at(0.005, REASON, Priority.HIGH),
    ]
    order = [0, 1, 4, 5, 3, 2]
    r = simulate(fleet(ALL), work, "static", mailbox_capacity=1, aging_s=math.inf)
    assert np.argsort(r.at + r.latency).tolist() == order
    # Aging: each 0.5 ms of waiting raises a request by a class, so a millisecond between two
    # arrivals outweighs any one class between them: arrival order.
    r = simulate(fleet(ALL), work, "static", mailbox_capacity=1, aging_s=0.0005)
    assert np.argsort(r.at + r.latency).tolist() == [0, 1, 2, 3, 4, 5]


def test_a_long_idle_gap_costs_nothing() -> None:
    r = simulate(fleet(CODER), [req(0.0), req(1e9)], "static")
    assert r.latency.tolist() == pytest.approx([0.07, 0.07])
    assert r.events < 10


def test_requests_in_any_order_are_replayed_by_arrival_time() -> None:
    work = [req(0.2), req(0.0), req(0.1)]
    r = simulate(fleet(CODER), work, "static")
    assert r.at.tolist() == [0.2, 0.0, 0.1]
    assert r.latency.tolist() == pytest.approx([0.07] * 3)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        simulate(fleet(CODER), [], "static", mailbox_capacity=0)
    with pytest.raises(ValueError):
        simulate(fleet(CODER), [], "static", sample_interval=0.0)
    with pytest.raises(ConfigError):
        SimRequest(0.0, Kind.AUTO, 1, 1, 1)
    with pytest.raises(ConfigError):
        SimRequest(0.0, CODE, 1, 5, 4)
    assert simulate(fleet(CODER), [], "static").requests == 0


# -- what the router sees ------------------------------------------------------------------------
class Recording:
    """The kernel's choice, recording what the table says at each decision."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, int], float, tuple[float, float], bool]] = []

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        for c in candidates:
            i = c.index
            self.seen.append((table.load(i), table.util(i), table.ewma(i), table.available(i)))
        i = table.choose(request.kind_index, request.est_tokens)
        return None if i < 0 else i


def test_the_router_is_fed_load_estimates_and_utilisation_as_live() -> None:
    f = ladder_fleet()
    policy = Recording()
    simulate(f, scenario("steady", f, seed=1, requests=800), policy, seed=1, mailbox_capacity=8)
    loads = [s[0] for s in policy.seen]
    assert max(busy for _, busy in loads) == 8  # the slots fill up
    assert max(queue for queue, _ in loads) > 0
    assert all(0.0 <= s[1] <= 1.0 for s in policy.seen)
    assert any(s[1] > 0.5 for s in policy.seen)
    assert policy.seen[0][2] == (0.0, 0.0)  # a fresh table, no priors
    assert all(s[2][0] > 0.0 for s in policy.seen[-3:])  # learned from completions
    assert any(not s[3] for s in policy.seen) or max(q for q, _ in loads) < 8


def test_priors_seed_the_estimates_from_the_profile() -> None:
    f = ladder_fleet()
    policy = Recording()
    simulate(f, [req(0.0)], policy, priors=True)
    coder = f.model("coder").profile
    per_request, per_token = policy.seen[1][2]
    assert per_token == pytest.approx(coder.step_s[0])
    assert per_request > coder.call_s


# -- the oracle and the quality measure -----------------------------------------------------------
def test_the_oracle_is_never_worse_than_static_on_mean_in_a_simple_case() -> None:
    # Two equal models on separate devices; only one prefers code. Code arrives at 1.5x what
    # one model serves: static queues it all on the first, the oracle uses both.
    f = Fleet.from_dict(
        {
            "models": [
                {**CODER, "call_s": 0.01, "prefill_token_s": 0.001, "step_s": [0.01]},
                {
                    "name": "other",
                    "kinds": ["code", "reason"],
                    "preferred": ["reason"],
                    "device": 0,
                    "call_s": 0.01,
                    "prefill_token_s": 0.001,
                    "step_s": [0.01],
                },
            ]
        }
    )
    work = [req(n * 0.07 / 1.5) for n in range(600)]
    static = simulate(f, work, "static").summary()
    for policy in ("oracle", "oracle_pen", OraclePolicy(harm=False)):
        oracle = simulate(f, work, policy).summary()
        assert oracle.latency.mean_s <= static.latency.mean_s
        assert oracle.latency.mean_s < 0.5 * static.latency.mean_s
    # At low load nothing needs to move: the oracle serves everything where static does.
    calm = [req(n * 0.2) for n in range(50)]
    oracle = simulate(f, calm, "oracle_pen").summary()
    assert oracle.spilled_share == 0.0
    assert oracle.latency.mean_s == pytest.approx(
        simulate(f, calm, "static").summary().latency.mean_s
    )


class Projecting(OraclePolicy):
    """The oracle, recording the finish time it projects for each request where it sends it."""

    def __init__(self) -> None:
        super().__init__()
        self.projected: list[float] = []

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        i = super().choose(request, table, candidates)
        assert i is not None and self._job is not None
        self.projected.append(self._contexts[i].project(self._now, self._job)[1])
        return i


def test_the_oracle_projects_the_exact_finish_when_nothing_else_arrives() -> None:
    f = Fleet.from_dict(
        {
            "models": [
                {
                    **CODER,
                    "call_s": 0.002,
                    "prefill_token_s": 0.0003,
                    "step_s": [0.004, 0.005, 0.007],
                    "jitter": 0.2,
                }
            ]
        }
    )
    work = [req(n * 0.01, prompt=10 + 7 * n, output=3 + (5 * n) % 11) for n in range(12)]
    oracle = Projecting()
    r = simulate(f, work, oracle, mailbox_capacity=64, seed=7)
    # The last request sees everything that will ever run: its projection is exact.
    assert oracle.projected[-1] == pytest.approx(r.at[-1] + r.latency[-1], abs=1e-9)
    # Earlier ones are projected before later arrivals delay them: never later than they end.
    assert all(p <= r.at[n] + r.latency[n] + 1e-9 for n, p in enumerate(oracle.projected))


def test_the_oracle_routes_only_inside_the_simulator() -> None:
    with pytest.raises(RuntimeError, match="simulate"):
        OraclePolicy().choose(RouteRequest(CODE, 1, 8.0), ScoreTable(1, 4), ())


class FirstCapable:
    name = "first"

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> int | None:
        return next(c.index for c in candidates if request.kind in c.kinds)


def test_the_quality_measure_weights_spills_by_the_quality_ranks_lost() -> None:
    f = ladder_fleet()  # coder (quality 1) can serve reasoning, the reasoner (0) prefers it
    work = [req(0.0, REASON), req(1.0, CODE), req(2.0, EMBED)]
    r = simulate(f, work, FirstCapable())
    assert r.spilled.tolist() == [True, False, False]
    assert r.quality.tolist() == [2.0, 0.0, 0.0]  # a spill, one rank down
    s = r.summary()
    assert s.quality == pytest.approx(2.0 / 3.0) and s.spilled_share == pytest.approx(1.0 / 3.0)
    static = simulate(f, scenario("steady", f, requests=500), "static").summary()
    assert static.quality == 0.0 and static.spilled_share == 0.0


# -- scenarios ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_loads_are_near_their_targets(name: str) -> None:
    f = ladder_fleet()
    s = SCENARIOS[name]
    cap = Capacity(f, s.shapes)
    targets = s.targets(f)
    start, end = targets[0][0], targets[-1][1]
    runs = [scenario(name, f, seed=seed) for seed in range(4)]
    for work in runs:
        assert len(work) >= 2500
        assert all(a.at <= b.at for a, b in itertools.pairwise(work))
    for model in targets[0][2]:
        # Each stretch at the co-load its targets imply.
        mean = sum((b - a) * t[model] for a, b, t in targets) / (end - start)
        offered = np.mean(
            [
                sum((b - a) * cap.offered(work, a, b, t)[model] for a, b, t in targets)
                / (end - start)
                for work in runs
            ]
        )
        assert offered == pytest.approx(mean, rel=0.1), model
    if name in ("surge", "overwhelm"):
        over = name == "overwhelm"
        surged = cap.surge_model(2.0 if over else 1.2, absorbable=not over)
        windows = [(a, b) for a, b, t in targets if t[surged] > 1.0]
        assert len(windows) == 3 and all(b - a == 30.0 for a, b in windows)
        level = targets[1][2][surged]
        for a, b in windows:
            offered = np.mean([cap.offered(work, a, b, targets[1][2])[surged] for work in runs])
            assert offered == pytest.approx(level, rel=0.1)


def test_calm_and_steady_are_at_their_nominal_loads() -> None:
    f = ladder_fleet()
    calm = SCENARIOS["calm"].targets(f)[0][2]
    steady = SCENARIOS["steady"].targets(f)[0][2]
    assert set(calm.values()) == {0.5} and set(steady.values()) == {0.75}


@pytest.mark.parametrize("make", [ladder_fleet, gpu_fleet])
def test_the_surge_is_absorbable_and_the_overwhelming_one_is_not(make: Any) -> None:
    f = make()
    cap = Capacity(f)
    surged = cap.surge_model()
    surge = surge_loads(f)
    assert 1.15 <= cap.model_loads(surge)[surged] <= 1.3
    assert cap.headroom(surge) > 1.0
    assert cap.headroom(surge, contended=True) > 1.0
    # The surge goes where it can be absorbed best: no other model's surge has more room.
    for name in cap.groups():
        if cap.absorbers(cap.groups()[name]):
            room = cap.headroom(cap.surge_loads(name, 1.2), contended=True)
            assert room <= cap.headroom(surge, contended=True)
    overwhelm = surge_loads(f, 2.0, absorbable=False)
    assert cap.headroom(overwhelm) < 0.6
    assert cap.headroom(overwhelm, contended=True) < 0.6
    assert math.isinf(cap.headroom({Kind.CODE: 0.5}))


def test_surges_follow_the_fleet() -> None:
    # On the 2-core ladder a coder surge cannot be absorbed (the reasoner would slow the coder
    # as much as it helps); the reasoner's can, by the coder. The overwhelming one is the coder's.
    cap = Capacity(ladder_fleet())
    assert cap.headroom(cap.surge_loads("coder", 1.2), contended=True) < 1.0
    assert cap.surge_model() == "reasoner"
    assert cap.surge_model(2.0, absorbable=False) == "coder"
    work = scenario("surge", ladder_fleet(), seed=1)
    reason = [r.at for r in work if r.kind is Kind.REASON]
    calm = sum(1 for t in reason if t < 180.0 and t % 60.0 < 30.0)
    surge = sum(1 for t in reason if t < 180.0 and t % 60.0 >= 30.0)
    assert surge > 1.8 * calm  # 120% in the surges against 50% between them


def test_scenarios_leave_out_kinds_no_model_serves() -> None:
    f = fleet(CODER)
    for name in SCENARIOS:
        work = scenario(name, f, requests=300)
        assert work and {r.kind for r in work} <= {Kind.SIMPLE, CODE}
        assert simulate(f, work, "dynamic").refused == 0


def test_requests_stretches_the_timeline_at_the_same_loads() -> None:
    f = ladder_fleet()
    small = scenario("calm", f, seed=1, requests=400)
    assert 300 <= len(small) <= 500
    assert small[-1].at < 40.0
    with pytest.raises(KeyError):
        scenario("nope", f)


# -- fleets and statistics ------------------------------------------------------------------------
def test_a_fleet_round_trips_through_its_dict_and_toml_forms(tmp_path: Path) -> None:
    for f in (ladder_fleet(), gpu_fleet()):
        assert Fleet.from_dict(f.to_dict()) == f
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[devices]\ncpu = { lanes = 2 }\n\n[[models]]\nname = "m"\nkinds = ["code"]\n'
        "call_s = 0.001\nprefill_token_s = 0.0001\nstep_s = [0.003, 0.004]\n"
    )
    loaded = load_fleet(path)
    assert loaded.models[0].profile.slots == 2 and loaded.lanes_of(None) == 2.0
    with pytest.raises(ConfigError, match=r"models\[0\]"):
        Fleet.from_dict({"models": [{"name": "m", "call_s": 0.001, "prefill_token_s": 0.0}]})
    with pytest.raises(ConfigError, match="coload"):
        fleet({**CODER, "coload": [1.2]})


def test_interval_is_the_median_with_order_statistics_around_it() -> None:
    ten = Interval.of([float(v) for v in range(10, 0, -1)])
    assert (ten.median, ten.low, ten.high, ten.n) == (5.5, 2.0, 9.0, 10)
    three = Interval.of([3.0, math.nan, 1.0, 2.0])
    assert (three.median, three.low, three.high, three.n) == (2.0, 1.0, 3.0, 3)
    assert math.isnan(Interval.of([]).median)
    assert f"{ten:.1f}" == "5.5 [2.0, 9.0]"
