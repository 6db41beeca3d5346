"""Tests of the scoring kernel.

Property tests run against both implementations (the ``kernel`` fixture, ids ``py``/``c``);
the agreement tests drive the reference and the compiled kernel side by side and require the
same choices, the same costs and estimates to the last bit, and the same errors.
"""

from __future__ import annotations

import array
import importlib.machinery
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import zeta
from zeta import _scoring_c, _scoring_py
from zeta._exceptions import KernelInputError

INF = math.inf
NO_CANDIDATE = _scoring_py.NO_CANDIDATE
MAX_COST = _scoring_py.MAX_COST
BAD_REALS = [math.nan, -1.0, -1e-300, math.inf, -math.inf, "1.0", None, 10**400]
BAD_COUNTS = [-1, 1.5, True, 2**31, 10**30, "1", None]


# -- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """Everything a table holds about one candidate."""

    queue: int
    in_flight: int
    req: float
    tok: float
    util: float
    available: bool
    capable: tuple[bool, ...]
    penalty: tuple[float, ...]


@dataclass(frozen=True)
class TableState:
    """A whole table, to build identical tables in both implementations."""

    n_kinds: int
    seed: int
    weight: float
    candidates: tuple[Candidate, ...]

    @property
    def n(self) -> int:
        return len(self.candidates)


@st.composite
def candidates(draw: st.DrawFn, n_kinds: int) -> Candidate:
    return Candidate(
        queue=draw(st.integers(0, 20)),
        in_flight=draw(st.integers(0, 4)),
        req=draw(st.floats(0.0, 5.0)),
        tok=draw(st.floats(0.0, 0.1)),
        util=draw(st.floats(0.0, 1.0)),
        available=draw(st.booleans()),
        capable=tuple(draw(st.lists(st.booleans(), min_size=n_kinds, max_size=n_kinds))),
        penalty=tuple(draw(st.lists(st.floats(0.0, 2.0), min_size=n_kinds, max_size=n_kinds))),
    )


@st.composite
def table_states(draw: st.DrawFn, max_n: int = 8) -> TableState:
    n_kinds = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    return TableState(
        n_kinds=n_kinds,
        seed=draw(st.integers(0, 10**6)),
        weight=draw(st.floats(0.0, 4.0)),
        candidates=tuple(draw(st.lists(candidates(n_kinds), min_size=n, max_size=n))),
    )


def build(kernel: ModuleType, state: TableState, *, tau: float = 5.0) -> Any:
    """A table of ``kernel`` holding ``state``."""
    t = kernel.ScoreTable(state.n, state.n_kinds, seed=state.seed, tau=tau, weight=state.weight)
    for i, c in enumerate(state.candidates):
        t.set_load(i, c.queue, c.in_flight)
        t.set_ewma(i, c.req, c.tok, 0.0)
        t.set_util(i, c.util)
        t.set_available(i, c.available)
        for k in range(state.n_kinds):
            t.set_capability(i, k, c.capable[k], c.penalty[k])
    return t


def snapshot(t: Any) -> tuple[Any, ...]:
    """Everything a table exposes through its getters."""
    rows = tuple(
        (
            t.load(i),
            t.ewma(i),
            t.util(i),
            t.available(i),
            tuple(t.capability(i, k) for k in range(t.n_kinds)),
        )
        for i in range(t.n)
    )
    return (t.n, t.n_kinds, t.tau, t.weight, rows)


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("error", message)`` for a KernelInputError."""
    try:
        return ("ok", fn(*args, **kwargs))
    except KernelInputError as exc:
        return ("error", str(exc))


def servable(state: TableState, kind: int) -> list[int]:
    return [
        i for i, c in enumerate(state.candidates) if c.capable[kind] and c.available
    ]  # fmt: skip


def expected_cost(c: Candidate, kind: int, est: float, weight: float) -> float:
    """The documented formula, written out independently of both kernels."""
    if not (c.capable[kind] and c.available):
        return INF
    u = min(c.util, 0.95)
    cost = (c.queue + c.in_flight + 1) * (c.req + est * c.tok) * (1 + weight * u / (1 - u))
    return min(cost + c.penalty[kind], MAX_COST)


kinds_and_estimates = st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 4096.0)), max_size=12)


# -- agreement between the compiled kernel and the reference -------------------------------------


@given(state=table_states(), messages=kinds_and_estimates)
def test_compiled_agrees_with_reference_on_random_tables(
    state: TableState, messages: list[tuple[int, float]]
) -> None:
    py, c = build(_scoring_py, state), build(_scoring_c, state)
    for kind, est in messages:
        kind %= state.n_kinds
        py_costs, c_costs = [0.0] * state.n, [0.0] * state.n
        assert py.choose(kind, est, py_costs) == c.choose(kind, est, c_costs)
        assert py_costs == c_costs
        for i in range(state.n):
            assert py.cost(i, kind, est) == c.cost(i, kind, est)
    assert snapshot(py) == snapshot(c)


def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> Any:
    """Mostly valid values (about seven in eight), so that most operations pass validation."""
    return st.integers(0, 7).flatmap(lambda x: invalid if x == 3 else valid)


invalid_inputs = st.sampled_from(
    [math.nan, -1.0, math.inf, -math.inf, -1, 1.5, True, "1", None, 2**31, 10**400, np.int32(-1)]
)
odd_reals = st.sampled_from([np.float64(0.5), np.float32(2.0), True, 3, 0])  # valid, not floats
odd_counts = st.sampled_from([np.int64(3), np.uint8(1), 2**31 - 1])  # valid, not small ints


@given(
    n=st.integers(1, 6),
    data=st.data(),
    est=mostly(st.floats(0.0, 4096.0) | odd_reals, invalid_inputs),
    rotation=mostly(st.integers(0, 10**30) | odd_counts, invalid_inputs),
    weight=mostly(st.floats(0.0, 4.0) | odd_reals, invalid_inputs),
    corrupt=st.booleans(),
    resize=st.integers(-1, 1) | st.just(0) | st.just(0),
    with_costs=st.booleans(),
)
def test_score_agrees_with_reference(
    n: int,
    data: st.DataObject,
    est: Any,
    rotation: Any,
    weight: Any,
    corrupt: bool,
    resize: int,
    with_costs: bool,
) -> None:
    counts = st.integers(0, 10) | odd_counts
    reals = st.floats(0.0, 10.0) | odd_reals
    arrays = [
        data.draw(st.lists(elements, min_size=n, max_size=n))
        for elements in (
            counts, counts, reals, reals, st.floats(0.0, 1.0), st.booleans(), reals, st.booleans(),
        )
    ]  # fmt: skip
    if corrupt:  # one invalid value somewhere
        arrays[data.draw(st.integers(0, 7))][data.draw(st.integers(0, n - 1))] = data.draw(
            invalid_inputs
        )
    if resize:  # one array of the wrong length
        which = data.draw(st.integers(0, 7))
        arrays[which] = arrays[which][:-1] if resize < 0 else [*arrays[which], 0]
    py_costs = [-1.0] * n if with_costs else None
    c_costs = [-1.0] * n if with_costs else None
    py = outcome(_scoring_py.score, *arrays, est, rotation, py_costs, weight=weight)
    c = outcome(_scoring_c.score, *arrays, est, rotation, c_costs, weight=weight)
    assert py == c
    assert py_costs == c_costs


st_index = mostly(st.integers(0, 2), st.integers(-1, 7) | st.just(True) | st.just(1.0))
st_kind = mostly(st.integers(0, 2), st.integers(-1, 3) | st.just(True))
st_real = mostly(st.floats(0.0, 2.0) | odd_reals, invalid_inputs)
st_count = mostly(st.integers(0, 9) | odd_counts, invalid_inputs | st.integers(-1, 2**31))


class TwinTables(RuleBasedStateMachine):
    """Applies random operations to a reference and a compiled table; they must stay identical.

    Inputs are sometimes invalid; then both must raise the same KernelInputError and change
    nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tables: tuple[Any, Any] = (None, None)

    @initialize(
        n=st.integers(3, 6) | st.integers(1, 2),
        n_kinds=st.integers(1, 3),
        seed=st.integers(0, 2**70),
        tau=st.floats(0.01, 100.0),
        weight=st.floats(0.0, 5.0),
        data=st.data(),
    )
    def create(
        self, n: int, n_kinds: int, seed: int, tau: float, weight: float, data: st.DataObject
    ) -> None:
        """Two identical tables with random capabilities, penalties and priors."""
        cells = [
            (i, k, data.draw(st.booleans()), data.draw(st.floats(0.0, 2.0)))
            for i in range(n)
            for k in range(n_kinds)
        ]
        priors = [
            (i, data.draw(st.floats(0.0, 2.0)), data.draw(st.floats(0.0, 0.1))) for i in range(n)
        ]
        tables = []
        for m in (_scoring_py, _scoring_c):
            t = m.ScoreTable(n, n_kinds, seed=seed, tau=tau, weight=weight)
            for cell in cells:
                t.set_capability(*cell)
            for i, req, tok in priors:
                t.set_ewma(i, req, tok, 0.0)
            tables.append(t)
        self.tables = (tables[0], tables[1])

    def both(self, method: str, *args: Any, **kwargs: Any) -> Any:
        results = [outcome(getattr(t, method), *args, **kwargs) for t in self.tables]
        assert results[0] == results[1], (method, args, kwargs)
        return results[0]

    @rule(i=st_index, kind=st_kind, capable=st.booleans(), penalty=st_real)
    def set_capability(self, i: Any, kind: Any, capable: bool, penalty: Any) -> None:
        self.both("set_capability", i, kind, capable, penalty)

    @rule(i=st_index, available=st.booleans())
    def set_available(self, i: Any, available: bool) -> None:
        self.both("set_available", i, available)

    @rule(i=st_index, queue=st_count, in_flight=st_count)
    def set_load(self, i: Any, queue: Any, in_flight: Any) -> None:
        self.both("set_load", i, queue, in_flight)

    @rule(
        i=st_index,
        queue=st.one_of(st.integers(-3, 3), st.just(1.0)),
        in_flight=st.one_of(st.integers(-3, 3), st.integers(-(2**64), 2**64)),
    )
    def add_load(self, i: Any, queue: Any, in_flight: Any) -> None:
        self.both("add_load", i, queue, in_flight)

    @rule(i=st_index, util=st.one_of(st.floats(0.0, 1.0), st_real))
    def set_util(self, i: Any, util: Any) -> None:
        self.both("set_util", i, util)

    @rule(i=st_index, req=st_real, tok=st_real, now=st.floats(0.0, 100.0))
    def set_ewma(self, i: Any, req: Any, tok: Any, now: float) -> None:
        self.both("set_ewma", i, req, tok, now)

    @rule(i=st_index, req=st_real, tok=st_real, now=st.one_of(st.floats(0.0, 100.0), st_real))
    def observe(self, i: Any, req: Any, tok: Any, now: Any) -> None:
        self.both("observe", i, req, tok, now)

    @rule(tau=st.one_of(st.none(), st.floats(0.01, 50.0), st_real), weight=st.none() | st_real)
    def set_params(self, tau: Any, weight: Any) -> None:
        self.both("set_params", tau=tau, weight=weight)

    @rule(i=st_index, kind=st_kind, est=st_real)
    def cost(self, i: Any, kind: Any, est: Any) -> None:
        self.both("cost", i, kind, est)

    @rule(kind=st_kind, est=st_real, costs=st.sampled_from(["none", "n", "short", "long"]))
    def choose(self, kind: Any, est: Any, costs: str) -> None:
        n = self.tables[0].n
        size = {"none": None, "n": n, "short": n - 1, "long": n + 1}[costs]
        buffers = [None if size is None else [0.0] * size for _ in range(2)]
        results = [
            outcome(t.choose, kind, est, b) for t, b in zip(self.tables, buffers, strict=True)
        ]
        assert results[0] == results[1]
        assert buffers[0] == buffers[1]

    @rule(
        data=st.data(),
        size=st.integers(0, 8),
        container=st.sampled_from(["array", "numpy", "list", "numpy64"]),
        out_len_delta=mostly(st.just(0), st.just(1)),
        reserve=st.booleans(),
        corrupt=mostly(st.just(False), st.just(True)),
    )
    def choose_batch(
        self,
        data: st.DataObject,
        size: int,
        container: str,
        out_len_delta: int,
        reserve: bool,
        corrupt: bool,
    ) -> None:
        k = self.tables[0].n_kinds
        messages = data.draw(
            st.lists(
                st.tuples(st.integers(0, k - 1), st.floats(0.0, 4096.0)),
                min_size=size,
                max_size=size,
            )
        )
        if corrupt and messages:  # one invalid message
            bad = st.sampled_from([(-1, 1.0), (k, 1.0), (0, math.nan), (0, -1.0), (0, math.inf)])
            messages[data.draw(st.integers(0, size - 1))] = data.draw(bad)
        outs = []
        results = []
        for t in self.tables:
            kinds, ests, out = _containers(container, messages, len(messages) + out_len_delta)
            results.append(outcome(t.choose_batch, kinds, ests, out, reserve))
            outs.append(list(out))
        assert results[0] == results[1]
        assert outs[0] == outs[1]

    @invariant()
    def same_state(self) -> None:
        if self.tables[0] is not None:
            assert snapshot(self.tables[0]) == snapshot(self.tables[1])


def _containers(container: str, messages: Sequence[tuple[int, float]], out_len: int) -> Any:
    kinds = [k for k, _ in messages]
    ests = [e for _, e in messages]
    if container == "array":
        return array.array("i", kinds), array.array("d", ests), array.array("i", [7] * out_len)
    if container == "numpy":
        return (
            np.array(kinds, dtype=np.int32),
            np.array(ests, dtype=np.float64),
            np.full(out_len, 7, dtype=np.int32),
        )
    if container == "numpy64":  # not the fast path's dtypes: the generic path
        return (
            np.array(kinds, dtype=np.int64),
            np.array(ests, dtype=np.float64),
            np.full(out_len, 7, dtype=np.int64),
        )
    return kinds, ests, [7] * out_len


TestTwinTables = TwinTables.TestCase
TestTwinTables.settings = settings(max_examples=60, stateful_step_count=30)


# -- decisions ----------------------------------------------------------------------------------


@given(state=table_states(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_never_chooses_an_unservable_candidate(
    kernel: ModuleType, state: TableState, kind: int, est: float
) -> None:
    kind %= state.n_kinds
    t = build(kernel, state)
    costs = [0.0] * state.n
    choice = t.choose(kind, est, costs)
    ok = servable(state, kind)
    if not ok:
        assert choice == NO_CANDIDATE
        assert costs == [INF] * state.n
        return
    assert choice in ok
    assert costs[choice] == min(costs)
    for i in range(state.n):
        assert math.isinf(costs[i]) == (i not in ok)


@given(state=table_states(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_costs_follow_the_documented_formula(
    kernel: ModuleType, state: TableState, kind: int, est: float
) -> None:
    kind %= state.n_kinds
    t = build(kernel, state)
    costs = [0.0] * state.n
    t.choose(kind, est, costs)
    for i, c in enumerate(state.candidates):
        want = expected_cost(c, kind, est, state.weight)
        assert costs[i] == pytest.approx(want, rel=1e-12)
        assert t.cost(i, kind, est) == costs[i]


@given(state=table_states(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_score_function_matches_the_table(
    kernel: ModuleType, state: TableState, kind: int, est: float
) -> None:
    kind %= state.n_kinds
    t = build(kernel, state)
    cs = state.candidates
    score_costs = [0.0] * state.n
    choice = kernel.score(
        [c.queue for c in cs],
        [c.in_flight for c in cs],
        [c.req for c in cs],
        [c.tok for c in cs],
        [c.util for c in cs],
        [c.capable[kind] for c in cs],
        [c.penalty[kind] for c in cs],
        [c.available for c in cs],
        est,
        state.seed,
        score_costs,
        weight=state.weight,
    )
    table_costs = [0.0] * state.n
    assert t.choose(kind, est, table_costs) == choice
    assert score_costs == table_costs


def test_a_servable_candidate_with_an_overflowing_cost_is_still_chosen(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(3, 1, weight=1e308)
    t.set_capability(1, 0, True)
    t.set_util(1, 1.0)  # contention overflows to inf; with zero estimates inf * 0 is NaN
    costs = [0.0] * 3
    assert t.choose(0, 0.0, costs) == 1
    assert costs == [INF, MAX_COST, INF]

    t.set_params(weight=1.0)
    t.set_ewma(1, 1e308, 1e308, 0.0)
    t.set_load(1, 2**31 - 1, 2**31 - 1)
    assert t.choose(0, 4096.0, costs) == 1
    assert costs == [INF, MAX_COST, INF]


@pytest.mark.parametrize(
    "field", ["queue", "in_flight", "req", "tok", "util", "penalty", "est"], ids=str
)
@given(
    state=table_states(),
    data=st.data(),
    kind=st.integers(0, 2),
    est=st.floats(0.0, 4096.0),
    more=st.floats(0.0, 100.0),
)
def test_cost_is_non_decreasing_in_load_estimates_and_utilisation(
    kernel: ModuleType,
    field: str,
    state: TableState,
    data: st.DataObject,
    kind: int,
    est: float,
    more: float,
) -> None:
    kind %= state.n_kinds
    i = data.draw(st.integers(0, state.n - 1))
    t = build(kernel, state)
    before = t.cost(i, kind, est)
    c = state.candidates[i]
    if field == "queue":
        t.add_load(i, int(more), 0)
    elif field == "in_flight":
        t.add_load(i, 0, int(more))
    elif field in ("req", "tok"):
        t.set_ewma(i, c.req + more * (field == "req"), c.tok + more * (field == "tok"), 0.0)
    elif field == "util":
        t.set_util(i, min(1.0, c.util + more))
    elif field == "penalty":
        t.set_capability(i, kind, c.capable[kind], c.penalty[kind] + more)
    else:
        est += more
    assert t.cost(i, kind, est) >= before


def test_equal_candidates_are_chosen_in_turn(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(6, 1, seed=4)
    for i in (0, 3, 4):
        t.set_capability(i, 0, True)
    # Round-robin among the equals from the seed, even with incapable ones between them.
    assert [t.choose(0, 10.0) for _ in range(7)] == [4, 0, 3, 4, 0, 3, 4]


@given(
    mask=st.lists(st.booleans(), min_size=1, max_size=10).filter(any),
    seed=st.integers(0, 1000),
    rounds=st.integers(1, 4),
)
def test_equal_candidates_share_work_evenly(
    kernel: ModuleType, mask: list[bool], seed: int, rounds: int
) -> None:
    t = kernel.ScoreTable(len(mask), 1, seed=seed)
    for i, capable in enumerate(mask):
        t.set_capability(i, 0, capable)
        t.set_ewma(i, 0.5, 0.01, 0.0)
    equals = [i for i, capable in enumerate(mask) if capable]
    picks = [t.choose(0, 64) for _ in range(rounds * len(equals))]
    assert sorted(picks) == sorted(equals * rounds)
    # In turn: each window of len(equals) consecutive decisions covers every equal candidate.
    for start in range(len(picks) - len(equals) + 1):
        assert sorted(picks[start : start + len(equals)]) == equals


@given(state=table_states(), messages=kinds_and_estimates)
def test_a_seeded_table_is_deterministic(
    kernel: ModuleType, state: TableState, messages: list[tuple[int, float]]
) -> None:
    a, b = build(kernel, state), build(kernel, state)
    for kind, est in messages:
        assert a.choose(kind % state.n_kinds, est) == b.choose(kind % state.n_kinds, est)


def test_the_seed_picks_where_ties_start(kernel: ModuleType) -> None:
    firsts = []
    for seed in range(8):
        t = kernel.ScoreTable(4, 1, seed=seed)
        for i in range(4):
            t.set_capability(i, 0, True)
        firsts.append(t.choose(0, 1.0))
    assert firsts == [0, 1, 2, 3, 0, 1, 2, 3]


def test_new_table_defaults(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(2, 3)
    assert (t.n, t.n_kinds, t.tau, t.weight) == (2, 3, 5.0, 1.0)
    assert t.load(1) == (0, 0)
    assert t.ewma(1) == (0.0, 0.0)
    assert t.util(1) == 0.0
    assert t.available(1) is True
    assert t.capability(1, 2) == (False, 0.0)
    assert t.choose(0, 1.0) == NO_CANDIDATE  # nothing is capable until told so


def test_accepts_numpy_scalars(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(2, 1)
    t.set_capability(np.int64(1), np.int32(0), np.bool_(True), np.float32(0.5))
    t.set_load(np.int64(1), np.int64(2), np.uint8(1))
    t.set_util(np.int64(1), np.float64(0.25))
    assert t.choose(np.int64(0), np.float32(8.0)) == 1
    assert t.load(1) == (2, 1)


# -- validation ---------------------------------------------------------------------------------


def _table(kernel: ModuleType) -> Any:
    t = kernel.ScoreTable(3, 2, seed=1)
    for i in range(3):
        t.set_capability(i, 0, True, 0.1 * i)
        t.set_ewma(i, 0.2, 0.01, 1.0)
        t.set_load(i, i, 1)
    return t


BAD_CALLS: list[tuple[str, Callable[..., Any]]] = []
for _bad in BAD_REALS:
    BAD_CALLS += [
        (f"choose est {_bad!r}", lambda t, b=_bad: t.choose(0, b)),
        (f"cost est {_bad!r}", lambda t, b=_bad: t.cost(0, 0, b)),
        (f"penalty {_bad!r}", lambda t, b=_bad: t.set_capability(0, 0, True, b)),
        (f"util {_bad!r}", lambda t, b=_bad: t.set_util(0, b)),
        (f"set_ewma req {_bad!r}", lambda t, b=_bad: t.set_ewma(0, b, 0.1, 2.0)),
        (f"set_ewma tok {_bad!r}", lambda t, b=_bad: t.set_ewma(0, 0.1, b, 2.0)),
        (f"set_ewma now {_bad!r}", lambda t, b=_bad: t.set_ewma(0, 0.1, 0.1, b)),
        (f"observe req {_bad!r}", lambda t, b=_bad: t.observe(0, b, 0.1, 2.0)),
        (f"observe tok {_bad!r}", lambda t, b=_bad: t.observe(0, 0.1, b, 2.0)),
        (f"observe now {_bad!r}", lambda t, b=_bad: t.observe(0, 0.1, 0.1, b)),
    ]
    if _bad is not None:  # None means "unchanged" to set_params
        BAD_CALLS += [
            (f"tau {_bad!r}", lambda t, b=_bad: t.set_params(tau=b, weight=2.0)),
            (f"weight {_bad!r}", lambda t, b=_bad: t.set_params(tau=1.0, weight=b)),
        ]
for _bad in BAD_COUNTS:
    BAD_CALLS += [
        (f"queue {_bad!r}", lambda t, b=_bad: t.set_load(0, b, 0)),
        (f"in_flight {_bad!r}", lambda t, b=_bad: t.set_load(0, 0, b)),
    ]
for _bad in [-1, 3, True, 1.0, None, "0", 2**70]:
    BAD_CALLS += [
        (f"index {_bad!r}", lambda t, b=_bad: t.set_available(b, False)),
        (f"index {_bad!r} getter", lambda t, b=_bad: t.load(b)),
        (f"index {_bad!r} cost", lambda t, b=_bad: t.cost(b, 0, 1.0)),
    ]
for _bad in [-1, 2, True, 1.0, None]:
    BAD_CALLS += [
        (f"kind {_bad!r}", lambda t, b=_bad: t.choose(b, 1.0)),
        (f"kind {_bad!r} capability", lambda t, b=_bad: t.set_capability(0, b, True)),
    ]
BAD_CALLS += [
    ("util above 1", lambda t: t.set_util(0, 1.0000001)),
    ("tau zero", lambda t: t.set_params(tau=0.0)),
    ("add_load below zero", lambda t: t.add_load(0, -1, 0)),
    ("add_load above MAX_COUNT", lambda t: t.add_load(0, 0, 2**31 - 1)),
    ("add_load float", lambda t: t.add_load(0, 1.0, 0)),
    ("add_load str", lambda t: t.add_load(0, 0, "1")),
    ("costs too short", lambda t: t.choose(0, 1.0, [0.0, 0.0])),
    ("costs too long", lambda t: t.choose(0, 1.0, [0.0] * 4)),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[name for name, _ in BAD_CALLS])
def test_invalid_input_raises_and_changes_nothing(
    kernel: ModuleType, call: Callable[[Any], Any]
) -> None:
    t, twin = _table(kernel), _table(kernel)
    with pytest.raises(KernelInputError):
        call(t)
    assert snapshot(t) == snapshot(twin)
    # Nor the rotation: the next decisions are the twin's.
    assert [t.choose(0, 1.0) for _ in range(4)] == [twin.choose(0, 1.0) for _ in range(4)]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 1), {}),
        ((True, 1), {}),
        ((1.0, 1), {}),
        ((-3, 1), {}),
        ((2, 0), {}),
        ((2, False), {}),
        ((2, 1), {"seed": -1}),
        ((2, 1), {"seed": 0.5}),
        ((2, 1), {"tau": 0.0}),
        ((2, 1), {"tau": math.nan}),
        ((2, 1), {"tau": math.inf}),
        ((2, 1), {"weight": -0.5}),
        ((2, 1), {"weight": math.inf}),
    ],
    ids=repr,
)
def test_invalid_table_shape_or_parameters_raise(
    kernel: ModuleType, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(KernelInputError):
        kernel.ScoreTable(*args, **kwargs)


def _score_args(n: int = 3) -> list[Any]:
    return [[0] * n, [0] * n, [0.1] * n, [0.01] * n, [0.0] * n, [1] * n, [0.0] * n, [1] * n, 8.0]


@pytest.mark.parametrize("position", range(8), ids=lambda p: f"array{p}")
@pytest.mark.parametrize("length", [2, 4], ids=lambda n: f"len{n}")
def test_score_rejects_mismatched_lengths(kernel: ModuleType, position: int, length: int) -> None:
    args = _score_args()
    args[position] = args[position][:1] * length
    with pytest.raises(KernelInputError):
        kernel.score(*args)


@pytest.mark.parametrize(
    ("position", "bad"),
    [(p, b) for p in (0, 1) for b in BAD_COUNTS]
    + [(p, b) for p in (2, 3, 4, 6) for b in BAD_REALS]
    + [(4, 1.5), (8, math.nan), (8, -2.0), (8, math.inf), (8, "3")],
    ids=repr,
)
def test_score_rejects_invalid_values(kernel: ModuleType, position: int, bad: Any) -> None:
    args = _score_args()
    costs = [-1.0] * 3
    if position < 8:
        args[position][2] = bad
    else:
        args[position] = bad
    with pytest.raises(KernelInputError):
        kernel.score(*args, costs=costs)
    assert costs == [-1.0] * 3  # validated before anything is written


@pytest.mark.parametrize(
    "kwargs",
    [
        {"costs": [0.0] * 2},
        {"rotation": -1},
        {"rotation": 1.0},
        {"weight": math.nan},
        {"weight": -1.0},
    ],
    ids=repr,
)
def test_score_rejects_invalid_options(kernel: ModuleType, kwargs: dict[str, Any]) -> None:
    with pytest.raises(KernelInputError):
        kernel.score(*_score_args(), **kwargs)


def test_score_rejects_no_candidates(kernel: ModuleType) -> None:
    with pytest.raises(KernelInputError):
        kernel.score(*_score_args(0))


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        ("contention", (math.nan,)),
        ("contention", (-0.1,)),
        ("contention", (1.5,)),
        ("contention", (0.5, -1.0)),
        ("contention", (0.5, math.inf)),
        ("peak_ewma", (math.nan, 1.0, 1.0, 1.0)),
        ("peak_ewma", (1.0, -1.0, 1.0, 1.0)),
        ("peak_ewma", (1.0, math.inf, 1.0, 1.0)),
        ("peak_ewma", (1.0, 0.5, math.nan, 1.0)),
        ("peak_ewma", (1.0, 0.5, -math.inf, 1.0)),
        ("peak_ewma", (1.0, 0.5, 1.0, 0.0)),
        ("peak_ewma", (1.0, 0.5, 1.0, math.inf)),
        ("peak_ewma", (1.0, 0.5, "1", 1.0)),
    ],
    ids=repr,
)
def test_scalar_functions_reject_invalid_values(
    kernel: ModuleType, fn: str, args: tuple[float, ...]
) -> None:
    with pytest.raises(KernelInputError):
        getattr(kernel, fn)(*args)


def test_contention(kernel: ModuleType) -> None:
    assert kernel.contention(0.0) == 1.0
    assert kernel.contention(0.5) == 2.0
    assert kernel.contention(0.5, 0.0) == 1.0
    assert kernel.contention(1.0) == kernel.contention(0.95) == pytest.approx(20.0)


# -- peak EWMA ----------------------------------------------------------------------------------

nonneg = st.floats(0.0, 1e6)


@given(old=nonneg, sample=nonneg, dt=st.floats(-10.0, 1e3), tau=st.floats(1e-3, 1e3))
def test_peak_ewma_follows_peaks_up_at_once(
    kernel: ModuleType, old: float, sample: float, dt: float, tau: float
) -> None:
    new = kernel.peak_ewma(old, sample, dt, tau)
    if sample >= old:
        assert new == sample
    elif dt <= 0:
        assert new == old
    else:  # a convex combination, up to rounding
        assert sample * (1 - 1e-15) <= new <= old * (1 + 1e-15)


@given(
    old=nonneg,
    sample=nonneg,
    dt=st.floats(0.0, 100.0),
    more=st.floats(0.0, 100.0),
    tau=st.floats(1e-2, 100.0),
)
def test_peak_ewma_decays_faster_with_time_and_slower_with_tau(
    kernel: ModuleType, old: float, sample: float, dt: float, more: float, tau: float
) -> None:
    base = kernel.peak_ewma(old, sample, dt, tau)
    slack = 1e-12 * max(old, sample)  # rounding of the blend
    assert kernel.peak_ewma(old, sample, dt + more, tau) <= base + slack
    assert kernel.peak_ewma(old, sample, dt, tau + more) >= base - slack


def test_peak_ewma_decays_with_time_constant_tau(kernel: ModuleType) -> None:
    assert kernel.peak_ewma(1.0, 0.0, 2.0, 2.0) == pytest.approx(math.exp(-1.0))
    assert kernel.peak_ewma(3.0, 1.0, 4.0, 2.0) == pytest.approx(1.0 + 2.0 * math.exp(-2.0))
    assert kernel.peak_ewma(3.0, 1.0, 1e9, 2.0) == pytest.approx(1.0)


def test_observe_jumps_to_peaks_and_decays_toward_the_new_level(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(1, 1, tau=2.0)
    t.observe(0, 1.0, 0.01, 0.0)
    assert t.ewma(0) == (1.0, 0.01)
    t.observe(0, 5.0, 0.02, 1.0)  # a peak: taken at once
    assert t.ewma(0) == (5.0, 0.02)
    now, prev = 1.0, 5.0
    for _ in range(12):  # back to 1.0: the excess shrinks by exp(-dt/tau) per step
        now += 2.0
        t.observe(0, 1.0, 0.02, now)
        req = t.ewma(0)[0]
        assert req - 1.0 == pytest.approx((prev - 1.0) * math.exp(-1.0))
        prev = req
    assert t.ewma(0)[0] == pytest.approx(1.0, abs=1e-4)


def test_observe_out_of_order_never_lowers(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(1, 1)
    t.observe(0, 2.0, 0.1, 10.0)
    t.observe(0, 1.0, 0.05, 5.0)  # older than the last observation
    assert t.ewma(0) == (2.0, 0.1)
    t.observe(0, 3.0, 0.2, 6.0)  # but a peak still counts
    assert t.ewma(0) == (3.0, 0.2)


def test_tau_sets_the_decay(kernel: ModuleType) -> None:
    fast, slow = kernel.ScoreTable(1, 1, tau=1.0), kernel.ScoreTable(1, 1)
    slow.set_params(tau=10.0)
    for t in (fast, slow):
        t.set_ewma(0, 4.0, 0.0, 0.0)
        t.observe(0, 0.0, 0.0, 1.0)
    assert fast.ewma(0)[0] == pytest.approx(4.0 * math.exp(-1.0))
    assert slow.ewma(0)[0] == pytest.approx(4.0 * math.exp(-0.1))


# -- choose_batch -------------------------------------------------------------------------------

CONTAINERS = ["array", "numpy", "numpy_strided", "list", "numpy64"]


def _batch_inputs(container: str, messages: list[tuple[int, float]]) -> tuple[Any, Any, Any]:
    if container == "numpy_strided":  # every other element of larger arrays
        kinds = np.zeros(2 * len(messages), dtype=np.int32)
        ests = np.zeros(2 * len(messages), dtype=np.float64)
        kinds[::2] = [k for k, _ in messages]
        ests[::2] = [e for _, e in messages]
        out = np.full(2 * len(messages), 7, dtype=np.int32)
        return kinds[::2], ests[::2], out[::2]
    return _containers(container, messages, len(messages))


@pytest.mark.parametrize("container", CONTAINERS)
@given(state=table_states(), messages=kinds_and_estimates, reserve=st.booleans())
def test_choose_batch_equals_repeated_choose(
    kernel: ModuleType,
    container: str,
    state: TableState,
    messages: list[tuple[int, float]],
    reserve: bool,
) -> None:
    messages = [(k % state.n_kinds, e) for k, e in messages]
    batch, single = build(kernel, state), build(kernel, state)
    kinds, ests, out = _batch_inputs(container, messages)
    misses = batch.choose_batch(kinds, ests, out, reserve)

    expected = []
    for kind, est in messages:
        c = single.choose(kind, est)
        expected.append(c)
        if reserve and c != NO_CANDIDATE:
            single.add_load(c, 1, 0)
    assert list(out) == expected
    assert misses == expected.count(NO_CANDIDATE)
    assert snapshot(batch) == snapshot(single)
    assert batch.choose(0, 1.0) == single.choose(0, 1.0)  # same rotation afterwards


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize(
    "messages",
    [
        [(0, 1.0), (0, 2.0), (2, 1.0)],  # kind out of range, last
        [(0, 1.0), (-1, 2.0), (0, 1.0)],
        [(0, math.nan), (0, 1.0)],
        [(0, 1.0), (0, -1.0)],
        [(0, 1.0), (1, math.inf)],
    ],
    ids=["kind_high", "kind_negative", "nan", "negative", "inf"],
)
def test_choose_batch_validation_leaves_state_unchanged(
    kernel: ModuleType, container: str, messages: list[tuple[int, float]]
) -> None:
    t, twin = _table(kernel), _table(kernel)
    kinds, ests, out = _batch_inputs(container, messages)
    with pytest.raises(KernelInputError):
        t.choose_batch(kinds, ests, out)
    assert list(out) == [7] * len(messages)
    assert snapshot(t) == snapshot(twin)
    assert [t.choose(0, 1.0) for _ in range(4)] == [twin.choose(0, 1.0) for _ in range(4)]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize(
    "lengths", [(3, 2, 3), (2, 3, 3), (3, 3, 2), (3, 3, 4)], ids=lambda x: "-".join(map(str, x))
)
def test_choose_batch_rejects_mismatched_lengths(
    kernel: ModuleType, container: str, lengths: tuple[int, int, int]
) -> None:
    t, twin = _table(kernel), _table(kernel)
    k, e, o = (_batch_inputs(container, [(0, 1.0)] * n)[j] for j, n in enumerate(lengths))
    with pytest.raises(KernelInputError):
        t.choose_batch(k, e, o)
    assert snapshot(t) == snapshot(twin)


def test_choose_batch_of_nothing(kernel: ModuleType) -> None:
    t = _table(kernel)
    assert t.choose_batch(array.array("i"), array.array("d"), array.array("i")) == 0
    assert t.choose_batch([], [], []) == 0


def test_choose_batch_counts_misses(kernel: ModuleType) -> None:
    t = _table(kernel)  # only kind 0 is served
    out = array.array("i", [7] * 4)
    kinds = array.array("i", [0, 1, 0, 1])
    assert t.choose_batch(kinds, array.array("d", [1.0] * 4), out, reserve=False) == 2
    assert out[1] == out[3] == NO_CANDIDATE
    assert snapshot(t) == snapshot(_table(kernel))  # reserve=False: load untouched


# -- hostile inputs: callbacks that mutate the inputs, buffers that overlap ---------------------
# Validation runs Python code (__float__, __index__, a finaliser), which may shrink a list after
# its length was checked. The compiled kernel is built with boundscheck off, so these crashed it;
# both kernels must raise the reference's IndexError instead.


def _shrinking(victim: list[Any], value: Any) -> Any:
    """An object that empties ``victim`` when the kernel converts it to a number."""

    class Shrinking:
        def __float__(self) -> float:
            victim.clear()
            return float(value)

        def __index__(self) -> int:
            victim.clear()
            return int(value)

    return Shrinking()


@pytest.mark.parametrize("victim", [0, 7, 8], ids=["queue", "available", "costs"])
def test_score_survives_an_input_list_shrunk_by_validation(kernel: ModuleType, victim: int) -> None:
    args = _score_args()
    costs = [0.0] * 3
    target = costs if victim == 8 else args[victim]
    args[2] = [_shrinking(target, 0.1), 0.1, 0.1]  # ewma_req[0], validated after queue[0]
    with pytest.raises(IndexError):
        kernel.score(*args, 0, costs)


def test_choose_survives_a_costs_list_shrunk_by_a_finaliser(kernel: ModuleType) -> None:
    costs: list[Any] = []

    class EmptiesCostsWhenDropped:
        def __del__(self) -> None:
            costs.clear()

    costs.extend([EmptiesCostsWhenDropped(), 0.0, 0.0])
    with pytest.raises(IndexError):
        _table(kernel).choose(0, 1.0, costs)


@pytest.mark.parametrize("victim", ["kinds", "est_tokens", "out"])
def test_choose_batch_survives_an_input_list_shrunk_by_validation(
    kernel: ModuleType, victim: str
) -> None:
    tables = []
    for k in (kernel, _scoring_py):  # ends in the reference's state (out: after one decision)
        t = _table(k)
        lists: dict[str, list[Any]] = {"kinds": [0] * 3, "est_tokens": [1.0] * 3, "out": [7] * 3}
        lists["kinds"][0] = _shrinking(lists[victim], 0)
        with pytest.raises(IndexError):
            t.choose_batch(lists["kinds"], lists["est_tokens"], lists["out"])
        tables.append(t)
    assert snapshot(tables[0]) == snapshot(tables[1])
    assert tables[0].choose(0, 1.0) == tables[1].choose(0, 1.0)


def test_choose_batch_into_a_read_only_out_fails_like_the_reference(kernel: ModuleType) -> None:
    tables = []
    for k in (kernel, _scoring_py):
        t = _table(k)
        out = np.full(3, 7, dtype=np.int32)
        out.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            t.choose_batch([0, 0, 0], [1.0] * 3, out)
        tables.append(t)
    assert snapshot(tables[0]) == snapshot(tables[1])  # one decision, not reserved
    assert tables[0].choose(0, 1.0) == tables[1].choose(0, 1.0)


def test_choose_batch_with_a_huge_reported_length_raises_memory_error(kernel: ModuleType) -> None:
    class Huge:
        """Claims 2**62 elements: m * sizeof(int) wraps to 0 in 64-bit arithmetic."""

        def __len__(self) -> int:
            return 2**62

        def __getitem__(self, x: int) -> int:
            return 0

        def __setitem__(self, x: int, value: int) -> None:
            pass

    with pytest.raises(MemoryError):
        _table(kernel).choose_batch(Huge(), Huge(), Huge())


def _overlapping(case: str, m: int) -> tuple[Any, Any, Any]:
    """kinds, est_tokens and out for ``m`` kind-0 messages, ``out`` sharing memory with one."""
    if case == "est_ahead":  # out[x] is the high half of est_tokens[x + 1]
        ests = np.ones(m + 1, dtype=np.float64)
        return np.zeros(m, dtype=np.int32), ests[:m], ests.view(np.int32)[3::2]
    buf = np.zeros(m + 1, dtype=np.int32)
    views = {
        "same": (buf[:m], buf[:m]),
        "out_ahead": (buf[:m], buf[1:]),  # out[x] is kinds[x + 1]
        "out_behind": (buf[1:], buf[:m]),
        "reversed": (buf[:m], buf[m - 1 :: -1]),
    }
    kinds, out = views[case]
    return kinds, np.ones(m, dtype=np.float64), out


@pytest.mark.parametrize("case", ["same", "out_ahead", "out_behind", "reversed", "est_ahead"])
def test_choose_batch_with_out_overlapping_an_input_reads_the_inputs_first(
    kernel: ModuleType, case: str
) -> None:
    # Kind 0: candidate 1 for est_tokens 1 (cost 0.5 < 1.1), candidate 0 for a tiny estimate;
    # kind 1: candidate 0 only. A choice written over an input not yet read changes a decision.
    t, twin = kernel.ScoreTable(2, 2), kernel.ScoreTable(2, 2)
    for table in (t, twin):
        table.set_capability(0, 0, True)
        table.set_capability(1, 0, True)
        table.set_capability(0, 1, True)
        table.set_ewma(0, 0.1, 1.0, 0.0)
        table.set_ewma(1, 0.5, 0.0, 0.0)
    kinds, ests, out = _overlapping(case, 4)
    expected_out = array.array("i", [7] * 4)
    expected = twin.choose_batch(
        array.array("i", kinds.tolist()), array.array("d", ests.tolist()), expected_out, False
    )
    assert t.choose_batch(kinds, ests, out, False) == expected
    assert out.tolist() == expected_out.tolist()
    assert snapshot(t) == snapshot(twin)


def test_set_capability_changes_nothing_when_capable_has_no_truth_value(
    kernel: ModuleType,
) -> None:
    t, twin = _table(kernel), _table(kernel)
    with pytest.raises(ValueError, match="truth value"):
        t.set_capability(0, 0, np.array([True, False]), 5.0)
    assert snapshot(t) == snapshot(twin)


# -- implementation selection -------------------------------------------------------------------

_PROBE = (
    "import zeta, zeta._scoring as s; print(zeta.kernel_implementation(), s.ScoreTable.__module__)"
)


def _probe(no_extensions: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ZETA_NO_EXTENSIONS"}
    if no_extensions is not None:
        env["ZETA_NO_EXTENSIONS"] = no_extensions
    # The same source tree as this test process, whatever the current directory.
    env["PYTHONPATH"] = str(Path(zeta.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, "c zeta._scoring_c"),
        ("", "c zeta._scoring_c"),
        ("0", "c zeta._scoring_c"),
        ("1", "py zeta._scoring_py"),
    ],
    ids=["unset", "empty", "zero", "one"],
)
def test_selector_honours_zeta_no_extensions(setting: str | None, expected: str) -> None:
    assert _probe(setting) == expected


def test_compiled_kernel_is_an_extension_module() -> None:
    assert _scoring_c.__file__ is not None
    assert _scoring_c.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
