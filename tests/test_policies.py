"""Routing policies, driven directly with a ScoreTable: no scheduler, no clock, no threads."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeta import (
    ConfigError,
    DynamicPolicy,
    JoinShortestQueuePolicy,
    Kind,
    ModelSpec,
    PeakEwmaPolicy,
    PowerOfTwoChoicesPolicy,
    RoundRobinPolicy,
    RouteRequest,
    StaticPolicy,
    ThresholdPolicy,
)
from zeta._policies import POLICIES, Candidate, Policy, make_policy
from zeta._router import Router, build_candidates
from zeta._scoring import ScoreTable
from zeta._types import KIND_INDEX

CAPACITY = 9  # so a mailbox fill of (queue + in_flight) / 10 is easy to set


def ladder(coder_replicas: int = 1) -> list[ModelSpec]:
    served = frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON})
    return [
        ModelSpec(
            "coder", kinds=served, preferred=frozenset({Kind.SIMPLE, Kind.CODE}),
            replicas=coder_replicas, backend="simulated",
        ),
        ModelSpec("reasoner", kinds=served, preferred=frozenset({Kind.REASON}), backend="simulated"),
        ModelSpec("embedder", kinds=frozenset({Kind.EMBED}), backend="simulated"),
    ]  # fmt: skip


def setup(
    policy: Policy, coder_replicas: int = 1
) -> tuple[Router, ScoreTable, dict[str, list[int]]]:
    router = Router(build_candidates(ladder(coder_replicas), CAPACITY), policy)
    rows: dict[str, list[int]] = {}
    for c in router.candidates:
        rows.setdefault(c.model, []).append(c.index)
    return router, router.table, rows


def req(kind: Kind, difficulty: float = 0.5, est_tokens: float = 16.0) -> RouteRequest:
    return RouteRequest(kind, KIND_INDEX[kind], est_tokens, difficulty)


def model_of(router: Router, i: int | None) -> str | None:
    return None if i is None else router.candidates[i].model


# -- static ---------------------------------------------------------------------------------------
def test_static_fixed_rules() -> None:
    router, _, _ = setup(StaticPolicy())
    assert model_of(router, router.choose(req(Kind.SIMPLE))) == "coder"
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"
    assert model_of(router, router.choose(req(Kind.REASON))) == "reasoner"
    assert model_of(router, router.choose(req(Kind.EMBED))) == "embedder"


def test_static_never_spills() -> None:
    router, table, rows = setup(StaticPolicy())
    table.set_available(rows["coder"][0], False)
    assert router.choose(req(Kind.CODE)) is None


def test_static_balances_replicas_of_its_model() -> None:
    router, table, rows = setup(StaticPolicy(), coder_replicas=2)
    a, b = rows["coder"]
    table.set_load(a, 3, 1)
    assert router.choose(req(Kind.CODE)) == b


# -- threshold ------------------------------------------------------------------------------------
def test_threshold_spills_code_to_reasoner_with_hysteresis() -> None:
    policy = ThresholdPolicy(high=0.8, low=0.5, backlog_s=2.0)
    router, table, rows = setup(policy)
    coder = rows["coder"][0]
    table.observe(coder, 0.5, 0.0, 0.0)  # half a second per request
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"
    table.set_load(coder, 3, 1)  # 2 s of backlog: fully loaded
    assert model_of(router, router.choose(req(Kind.CODE))) == "reasoner"
    assert "coder" in policy.overloaded
    table.set_load(coder, 2, 1)  # 1.5 s, between the marks: keeps spilling
    assert model_of(router, router.choose(req(Kind.CODE))) == "reasoner"
    table.set_load(coder, 1, 0)  # 0.5 s, below the low mark: back home
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"
    assert "coder" not in policy.overloaded


def test_threshold_backlog_uses_the_requests_token_estimate() -> None:
    router, table, rows = setup(ThresholdPolicy(high=0.8, low=0.5, backlog_s=2.0))
    coder = rows["coder"][0]
    table.observe(coder, 0.0, 0.01, 0.0)  # 10 ms per token
    table.set_load(coder, 1, 1)
    assert model_of(router, router.choose(req(Kind.CODE, est_tokens=16))) == "coder"  # 0.32 s
    assert model_of(router, router.choose(req(Kind.CODE, est_tokens=100))) == "reasoner"  # 2 s


def test_threshold_ignores_device_utilisation() -> None:
    """Utilisation is a device-level reading shared by models on one device, and lags a burst:
    it says nothing about which model is overloaded."""
    router, table, rows = setup(ThresholdPolicy(high=0.8, low=0.5))
    table.set_util(rows["coder"][0], 1.0)
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"


def test_threshold_counts_mailbox_fill_as_load() -> None:
    router, table, rows = setup(ThresholdPolicy(high=0.8, low=0.5))
    table.set_load(rows["coder"][0], 8, 1)  # 9 of 10 slots
    assert model_of(router, router.choose(req(Kind.CODE))) == "reasoner"


def test_threshold_sends_easy_reasoning_to_an_idle_coder_only() -> None:
    router, table, rows = setup(ThresholdPolicy(high=0.8, low=0.5, max_spill_difficulty=0.4))
    table.set_load(rows["reasoner"][0], 8, 1)
    assert model_of(router, router.choose(req(Kind.REASON, difficulty=0.2))) == "coder"
    assert model_of(router, router.choose(req(Kind.REASON, difficulty=0.9))) == "reasoner"


def test_threshold_uses_the_rule_model_when_everyone_is_overloaded() -> None:
    router, table, rows = setup(ThresholdPolicy())
    table.set_load(rows["coder"][0], 8, 1)
    table.set_load(rows["reasoner"][0], 8, 1)
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"


def test_threshold_counts_a_wait_for_a_slot_not_a_running_batch() -> None:
    """Four requests decoding together in four slots are not two seconds of backlog: a new one
    waits for the first of them to finish, a quarter of a full batch's service time."""
    router, table, rows = setup(ThresholdPolicy(high=0.8, low=0.5, backlog_s=2.0))
    coder = rows["coder"][0]
    table.set_slots(coder, 4)
    table.set_step_slope(coder, 0.0)
    table.observe(coder, 1.0, 0.0, 0.0)
    table.set_load(coder, 0, 4)  # with one slot this was 4 s of backlog: spill
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"
    table.set_load(coder, 7, 4)  # 8 ahead, 4 at a time: 2 s to wait
    assert model_of(router, router.choose(req(Kind.CODE))) == "reasoner"


def test_threshold_rejects_bad_marks() -> None:
    with pytest.raises(ConfigError):
        ThresholdPolicy(high=0.5, low=0.6)
    with pytest.raises(ConfigError):
        ThresholdPolicy(max_spill_difficulty=2.0)
    with pytest.raises(ConfigError):
        ThresholdPolicy(backlog_s=0.0)


# -- dynamic --------------------------------------------------------------------------------------
def test_dynamic_prefers_the_preferred_model_when_idle() -> None:
    router, _, _ = setup(DynamicPolicy())
    assert model_of(router, router.choose(req(Kind.CODE))) == "coder"
    assert model_of(router, router.choose(req(Kind.REASON))) == "reasoner"


def test_dynamic_moves_away_from_a_loaded_model() -> None:
    router, table, rows = setup(DynamicPolicy())
    coder, reasoner = rows["coder"][0], rows["reasoner"][0]
    for i in (coder, reasoner):
        table.observe(i, 0.5, 0.01, 0.0)
    table.set_load(coder, 6, 1)
    assert model_of(router, router.choose(req(Kind.CODE))) == "reasoner"


def test_dynamic_is_the_kernel() -> None:
    router, table, _ = setup(DynamicPolicy(), coder_replicas=2)
    for i in range(table.n):
        table.observe(i, 0.1 * (i + 1), 0.001, 0.0)
    twin = ScoreTable(table.n, table.n_kinds)
    for i in range(table.n):
        twin.observe(i, 0.1 * (i + 1), 0.001, 0.0)
        for k in range(table.n_kinds):
            twin.set_capability(i, k, *table.capability(i, k))
    assert router.choose(req(Kind.CODE)) == twin.choose(KIND_INDEX[Kind.CODE], 16.0)


# -- baselines ------------------------------------------------------------------------------------
def test_round_robin_cycles_over_capable_available_candidates() -> None:
    router, table, rows = setup(RoundRobinPolicy(), coder_replicas=2)
    picks = [model_of(router, router.choose(req(Kind.CODE))) for _ in range(6)]
    assert picks.count("coder") == 4 and picks.count("reasoner") == 2
    assert "embedder" not in picks
    table.set_available(rows["reasoner"][0], False)
    assert {model_of(router, router.choose(req(Kind.CODE))) for _ in range(4)} == {"coder"}


def test_join_shortest_queue() -> None:
    router, table, rows = setup(JoinShortestQueuePolicy(), coder_replicas=2)
    a, b = rows["coder"]
    table.set_load(a, 2, 1)
    table.set_load(b, 0, 1)
    table.set_load(rows["reasoner"][0], 4, 1)
    assert router.choose(req(Kind.CODE)) == b


def test_power_of_two_never_takes_the_longer_of_its_pair() -> None:
    policy = PowerOfTwoChoicesPolicy(seed=7)
    router, table, rows = setup(policy, coder_replicas=2)
    a, b = rows["coder"]
    r = rows["reasoner"][0]
    table.set_load(a, 5, 1)
    table.set_load(b, 0, 0)
    table.set_load(r, 2, 1)
    picks = [router.choose(req(Kind.CODE)) for _ in range(200)]
    # The longest queue loses every pair it is drawn into.
    assert a not in picks
    assert set(picks) == {b, r}


def test_join_shortest_queue_prefers_a_free_slot() -> None:
    """Three requests in four slots leave one free; one request in one slot leaves none."""
    router, table, rows = setup(JoinShortestQueuePolicy(), coder_replicas=2)
    a, b = rows["coder"]
    table.set_available(rows["reasoner"][0], False)
    table.set_slots(a, 4)
    table.set_load(a, 0, 3)
    table.set_load(b, 0, 1)
    assert [router.choose(req(Kind.CODE)) for _ in range(3)] == [a, a, a]
    table.set_load(a, 1, 4)  # full too, and busier per slot: 5 / 4 > 1
    assert router.choose(req(Kind.CODE)) == b


def test_power_of_two_prefers_a_free_slot() -> None:
    router, table, rows = setup(PowerOfTwoChoicesPolicy(seed=3), coder_replicas=2)
    a, b = rows["coder"]
    table.set_available(rows["reasoner"][0], False)
    table.set_slots(a, 8)
    table.set_load(a, 2, 5)
    table.set_load(b, 0, 1)
    assert {router.choose(req(Kind.CODE)) for _ in range(20)} == {a}


def test_power_of_two_is_seeded() -> None:
    def run(seed: int) -> list[int | None]:
        router, _, _ = setup(PowerOfTwoChoicesPolicy(seed=seed), coder_replicas=3)
        return [router.choose(req(Kind.CODE)) for _ in range(50)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_peak_ewma_picks_the_lowest_expected_wait() -> None:
    router, table, rows = setup(PeakEwmaPolicy())
    coder, reasoner = rows["coder"][0], rows["reasoner"][0]
    table.observe(coder, 1.0, 0.0, 0.0)
    table.observe(reasoner, 0.2, 0.0, 0.0)
    table.set_load(reasoner, 2, 1)  # 4 * 0.2 = 0.8 < 1 * 1.0
    assert router.choose(req(Kind.CODE)) == reasoner
    table.set_load(reasoner, 4, 1)  # 6 * 0.2 = 1.2 > 1.0
    assert router.choose(req(Kind.CODE)) == coder


def test_peak_ewma_counts_no_wait_for_a_free_slot() -> None:
    router, table, rows = setup(PeakEwmaPolicy())
    coder, reasoner = rows["coder"][0], rows["reasoner"][0]
    table.observe(coder, 0.5, 0.0, 0.0)
    table.observe(reasoner, 0.4, 0.0, 0.0)
    table.set_slots(coder, 4)
    table.set_load(coder, 0, 3)  # a free slot: 0.5 (with one slot it was 4 * 0.5)
    table.set_load(reasoner, 0, 1)  # 2 * 0.4 = 0.8
    assert router.choose(req(Kind.CODE)) == coder
    table.set_load(coder, 3, 4)  # 8 requests, 4 at a time: 2 * 0.5 = 1.0 > 0.8
    assert router.choose(req(Kind.CODE)) == reasoner


def test_peak_ewma_uses_the_step_time_at_its_occupancy() -> None:
    router, table, rows = setup(PeakEwmaPolicy())
    coder, reasoner = rows["coder"][0], rows["reasoner"][0]
    for i in (coder, reasoner):
        table.set_slots(i, 4)
        table.observe(i, 0.0, 0.01, 0.0)  # 10 ms per token at one sequence
    table.set_step_slope(coder, 0.5)
    table.set_step_slope(reasoner, 0.1)
    table.set_load(coder, 0, 2)  # joins at 3 sequences: 16 * 0.01 * 2.0
    table.set_load(reasoner, 0, 3)  # joins at 4 sequences: 16 * 0.01 * 1.3
    assert router.choose(req(Kind.CODE)) == reasoner


# -- common properties ----------------------------------------------------------------------------
def test_make_policy_by_name_and_object() -> None:
    for name, cls in POLICIES.items():
        policy = make_policy(name, seed=1)
        assert isinstance(policy, cls) and policy.name == name
    custom = JoinShortestQueuePolicy()
    assert make_policy(custom) is custom
    with pytest.raises(ConfigError):
        make_policy("nope")
    with pytest.raises(ConfigError):
        make_policy(object())  # type: ignore[arg-type]


class _Rogue:
    name = "rogue"

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def choose(
        self, request: RouteRequest, table: ScoreTable, candidates: Sequence[Candidate]
    ) -> object:
        return self.answer


@pytest.mark.parametrize("answer", [99, -1, True, "0", 2])  # 2 is the embedder: cannot serve code
def test_router_rejects_an_impossible_choice(answer: object) -> None:
    router, _, _ = setup(_Rogue(answer))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="rogue"):
        router.choose(req(Kind.CODE))


@settings(max_examples=150, deadline=None)
@given(
    policy_name=st.sampled_from(sorted(POLICIES)),
    kind=st.sampled_from([Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON]),
    state=st.lists(
        st.tuples(
            st.integers(0, 9),
            st.integers(0, 8),
            st.floats(0, 1),
            st.booleans(),
            st.floats(0, 2),
            st.integers(1, 8),
        ),
        min_size=4,
        max_size=4,
    ),
    difficulty=st.floats(0, 1),
)
def test_every_policy_returns_a_capable_available_candidate_or_none(
    policy_name: str,
    kind: Kind,
    state: list[tuple[int, int, float, bool, float, int]],
    difficulty: float,
) -> None:
    router, table, _ = setup(make_policy(policy_name, seed=5), coder_replicas=2)
    for i, (queue, in_flight, util, available, ewma, slots) in enumerate(state):
        table.set_slots(i, slots)
        table.set_load(i, queue, in_flight)
        table.set_util(i, util)
        table.set_available(i, available)
        table.observe(i, ewma, ewma / 100, 0.0)
    eligible = [c.index for c in router.candidates if kind in c.kinds and table.available(c.index)]
    choice = router.choose(req(kind, difficulty))  # raises if the choice is impossible
    if choice is not None:
        assert choice in eligible
    elif policy_name not in ("static", "threshold"):
        # Work-conserving policies place a request whenever any candidate can take it.
        assert not eligible
