"""Tests of the scoring kernel.

Property tests run against both implementations (the ``kernel`` fixture, ids ``py``/``c``);
the agreement tests drive the reference and the compiled kernel side by side and require the
same choices, the same costs and estimates to the last bit, and the same errors.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import subprocess
import sys
from collections import Counter
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
MAX_SLOTS = _scoring_py.MAX_SLOTS
MAX_STEP_SLOPE = _scoring_py.MAX_STEP_SLOPE
DEFAULT_STEP_SLOPE = _scoring_py.DEFAULT_STEP_SLOPE
MAX_CO_SLOW = _scoring_py.MAX_CO_SLOW
DEFAULT_CO_SLOW = _scoring_py.DEFAULT_CO_SLOW
QUANTUM = _scoring_py.CO_SLOW_QUANTUM
MAX_COUNT = _scoring_py.MAX_COUNT
BAD_REALS = [math.nan, -1.0, -1e-300, math.inf, -math.inf, "1.0", None, 10**400]
BAD_COUNTS = [-1, 1.5, True, 2**31, 10**30, "1", None]


# -- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """Everything a table holds about one candidate.

    ``tok`` is the per-token time observed with ``seen_busy`` sequences in the context; the
    table keeps ``tok / g(seen_busy)``, the time at one sequence (:meth:`tok1`), and ``co_slow``
    rounded to a multiple of ``CO_SLOW_QUANTUM`` (:meth:`co`).
    """

    queue: int
    in_flight: int
    slots: int
    slope: float
    req: float
    tok: float
    seen_busy: int
    util: float
    available: bool
    capable: tuple[bool, ...]
    penalty: tuple[float, ...]
    device: int
    co_slow: float

    def tok1(self) -> float:
        busy = min(max(self.seen_busy, 1), self.slots)
        return self.tok / (1.0 + self.slope * (busy - 1))

    def co(self) -> float:
        return quantized(self.co_slow)


def quantized(co_slow: float) -> float:
    """``co_slow`` as a table stores it: the nearest multiple of 2**-20 (ties up)."""
    return math.floor(co_slow / QUANTUM + 0.5) * QUANTUM


@dataclass(frozen=True)
class TableState:
    """A whole table, to build identical tables in both implementations."""

    n_kinds: int
    seed: int
    weight: float
    harm_weight: float
    candidates: tuple[Candidate, ...]

    @property
    def n(self) -> int:
        return len(self.candidates)


@st.composite
def candidates(draw: st.DrawFn, n_kinds: int) -> Candidate:
    return Candidate(
        queue=draw(st.integers(0, 20) | st.just(0)),
        in_flight=draw(st.integers(0, 4)),
        slots=draw(st.sampled_from([1, 1, 2, 4, 8]) | st.integers(1, MAX_SLOTS)),
        slope=draw(st.sampled_from([0.0, 0.07, 0.2, DEFAULT_STEP_SLOPE]) | st.floats(0.0, 2.0)),
        req=draw(st.floats(0.0, 5.0)),
        tok=draw(st.floats(0.0, 0.1)),
        seen_busy=draw(st.integers(0, 10)),
        util=draw(st.floats(0.0, 1.0)),
        available=draw(st.booleans()),
        capable=tuple(draw(st.lists(st.booleans(), min_size=n_kinds, max_size=n_kinds))),
        penalty=tuple(draw(st.lists(st.floats(0.0, 2.0), min_size=n_kinds, max_size=n_kinds))),
        # Few devices, so that rows share them; now and then a large id.
        device=draw(st.integers(0, 2) | st.sampled_from([7, MAX_COUNT])),
        co_slow=draw(st.sampled_from([0.0, 0.24, 0.5, 0.94, 1.0]) | st.floats(0.0, MAX_CO_SLOW)),
    )


@st.composite
def table_states(draw: st.DrawFn, max_n: int = 8) -> TableState:
    n_kinds = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    return TableState(
        n_kinds=n_kinds,
        seed=draw(st.integers(0, 10**6)),
        weight=draw(st.floats(0.0, 4.0)),
        harm_weight=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 4.0)),
        candidates=tuple(draw(st.lists(candidates(n_kinds), min_size=n, max_size=n))),
    )


def build(kernel: ModuleType, state: TableState, *, tau: float = 5.0) -> Any:
    """A table of ``kernel`` holding ``state``."""
    t = kernel.ScoreTable(
        state.n,
        state.n_kinds,
        seed=state.seed,
        tau=tau,
        weight=state.weight,
        harm_weight=state.harm_weight,
    )
    for i, c in enumerate(state.candidates):
        t.set_load(i, c.queue, c.in_flight)
        t.set_device(i, c.device)  # after the load: a busy row moves its share along
        t.set_co_slow(i, c.co_slow)
        t.set_slots(i, c.slots)
        t.set_step_slope(i, c.slope)
        # A new row's first observation sets it exactly (normalised to one sequence).
        t.observe(i, c.req, c.tok, 0.0, busy=c.seen_busy)
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
            t.slots(i),
            t.step_slope(i),
            t.ewma(i),
            t.util(i),
            t.available(i),
            tuple(t.capability(i, k) for k in range(t.n_kinds)),
            t.device(i),
            t.co_slow(i),
        )
        for i in range(t.n)
    )
    return (t.n, t.n_kinds, t.tau, t.weight, t.harm_weight, rows)


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


@dataclass(frozen=True)
class Row:
    """What the cost of one row reads, from a :class:`TableState` or from a table's getters."""

    queue: int
    busy: int
    slots: int
    slope: float
    req: float
    tok1: float
    util: float
    device: int
    co: float
    servable: bool
    penalty: float


def rows_of_state(state: TableState, kind: int) -> list[Row]:
    return [
        Row(
            queue=c.queue,
            busy=c.in_flight,
            slots=c.slots,
            slope=c.slope,
            req=c.req,
            tok1=c.tok1(),
            util=c.util,
            device=c.device,
            co=c.co(),
            servable=c.capable[kind] and c.available,
            penalty=c.penalty[kind],
        )
        for c in state.candidates
    ]


def rows_of_table(t: Any, kind: int) -> list[Row]:
    rows = []
    for i in range(t.n):
        capable, penalty = t.capability(i, kind)
        queue, busy = t.load(i)
        req, tok1 = t.ewma(i)
        rows.append(
            Row(
                queue=queue,
                busy=busy,
                slots=t.slots(i),
                slope=t.step_slope(i),
                req=req,
                tok1=tok1,
                util=t.util(i),
                device=t.device(i),
                co=t.co_slow(i),
                servable=capable and t.available(i),
                penalty=penalty,
            )
        )
    return rows


def documented_costs(
    rows: Sequence[Row], weight: float, harm_weight: float, est: float
) -> list[float]:
    """Every row's documented cost, written out as the README states it, independently of both
    kernels (and of their evaluation order: compare with a tolerance)."""
    out = []
    for i, r in enumerate(rows):
        if not r.servable:
            out.append(INF)
            continue

        def service(k: int, r: Row = r) -> float:
            return r.req + est * r.tok1 * (1 + r.slope * (k - 1))

        n = r.queue + r.busy + 1
        k = min(n, r.slots)
        wait = max(0, n - r.slots) / r.slots * service(r.slots)
        u = min(r.util, 0.95)
        cont = 1 + weight * u / (1 - u)
        mates = [o for j, o in enumerate(rows) if j != i and o.device == r.device]
        others = sum(1 for o in mates if o.busy > 0)
        harm = sum(min(o.busy, o.slots) * o.co for o in mates)
        own = (wait + service(k)) * cont * (1 + r.co * others)
        same = (k - 1) * est / 2 * r.tok1 * r.slope
        device = harm * service(k) * cont
        out.append(min(own + harm_weight * (same + device) + r.penalty, MAX_COST))
    return out


def contention(util: float, weight: float) -> float:
    """The reference's contention, in its order (the tests below compare to the last bit)."""
    u = min(util, 0.95)
    return 1.0 + weight * u / (1.0 - u)


def costs_from_scratch(t: Any, kind: int, est: float) -> list[float]:
    """Every row's cost in the kernels' own evaluation order (``_scoring_py``'s docstring), from
    the table's getters, with the per-device sums recomputed from scratch. Shares and sums are
    whole numbers of quanta, so the sums are exact in any order: this equals the kernel's cost
    to the last bit exactly when the sums the setters keep are right."""
    rows = rows_of_table(t, kind)
    busy: Counter[int] = Counter()
    harm: Counter[int] = Counter()
    for r in rows:
        busy[r.device] += r.busy > 0
        harm[r.device] += min(r.busy, r.slots) * r.co
    out = []
    for r in rows:
        if not r.servable:
            out.append(INF)
            continue
        n, s = r.queue + r.busy + 1, r.slots
        k = min(n, s)
        m = n / s if n > s else 1.0
        tokg = r.tok1 * (1.0 + r.slope * (k - 1))
        nudge = 0.5 * (k - 1) * r.slope * r.tok1
        others = busy[r.device] - (1 if r.busy > 0 else 0)
        h = harm[r.device] - min(r.busy, s) * r.co
        cont = contention(r.util, t.weight)
        svc = r.req + est * tokg
        c = m * svc * cont * (1.0 + r.co * others)
        if t.harm_weight != 0.0:
            c = c + t.harm_weight * (est * nudge + h * svc * cont)
        c = c + r.penalty
        out.append(c if c <= MAX_COST else MAX_COST)
    return out


def old_cost(t: Any, i: int, kind: int, est: float) -> float:
    """Row ``i``'s cost as the kernel computed it before devices and harm were modelled (in its
    order, from the getters): what ``harm_weight = 0`` and ``co_slow = 0`` must give, bit for
    bit."""
    capable, penalty = t.capability(i, kind)
    if not (capable and t.available(i)):
        return INF
    queue, busy = t.load(i)
    req, tok1 = t.ewma(i)
    n, s = queue + busy + 1, t.slots(i)
    m, k = (n / s, s) if n > s else (1.0, n)
    tokg = tok1 * (1.0 + t.step_slope(i) * (k - 1))
    c = m * (req + est * tokg) * contention(t.util(i), t.weight) + penalty
    return c if c <= MAX_COST else MAX_COST


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
    assert snapshot(py) == snapshot(c)


def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> Any:
    """Mostly valid values (about seven in eight), so that most operations pass validation."""
    return st.integers(0, 7).flatmap(lambda x: invalid if x == 3 else valid)


invalid_inputs = st.sampled_from(
    [math.nan, -1.0, math.inf, -math.inf, -1, 1.5, True, "1", None, 2**31, 10**400, np.int32(-1)]
)
odd_reals = st.sampled_from([np.float64(0.5), np.float32(2.0), True, 3, 0])  # valid, not floats
odd_counts = st.sampled_from([np.int64(3), np.uint8(1), 2**31 - 1])  # valid, not small ints


st_index = mostly(st.integers(0, 2), st.integers(-1, 7) | st.just(True) | st.just(1.0))
st_kind = mostly(st.integers(0, 2), st.integers(-1, 3) | st.just(True))
st_real = mostly(st.floats(0.0, 2.0) | odd_reals, invalid_inputs)
st_count = mostly(st.integers(0, 9) | odd_counts, invalid_inputs | st.integers(-1, 2**31))
st_slots = mostly(
    st.integers(1, 8) | st.sampled_from([MAX_SLOTS, np.int64(4), np.uint8(2)]),
    invalid_inputs | st.sampled_from([0, MAX_SLOTS + 1, np.int64(0), 4.0]),
)
st_slope = mostly(
    st.floats(0.0, 1.0) | st.sampled_from([MAX_STEP_SLOPE, np.float32(0.25), 0]),
    invalid_inputs | st.sampled_from([MAX_STEP_SLOPE * (1 + 1e-15), 11]),
)
st_device = mostly(
    st.integers(0, 3) | st.sampled_from([MAX_COUNT, np.int64(2), np.uint8(1)]),
    invalid_inputs | st.sampled_from([MAX_COUNT + 1, 2.0, np.int64(-1)]),
)
st_co_slow = mostly(
    st.floats(0.0, 2.0) | st.sampled_from([MAX_CO_SLOW, 0.94, 1.5 * QUANTUM, np.float32(0.25), 1]),
    invalid_inputs | st.sampled_from([MAX_CO_SLOW * (1 + 1e-15), 11]),
)


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
        harm_weight=st.just(0.0) | st.floats(0.0, 5.0),
        co_slow=st.floats(0.0, MAX_CO_SLOW),
        data=st.data(),
    )
    def create(
        self,
        n: int,
        n_kinds: int,
        seed: int,
        tau: float,
        weight: float,
        harm_weight: float,
        co_slow: float,
        data: st.DataObject,
    ) -> None:
        """Two identical tables with random capabilities, penalties, priors, slots, load and
        devices."""
        cells = [
            (i, k, data.draw(st.booleans()), data.draw(st.floats(0.0, 2.0)))
            for i in range(n)
            for k in range(n_kinds)
        ]
        priors = [
            (i, data.draw(st.floats(0.0, 2.0)), data.draw(st.floats(0.0, 0.1))) for i in range(n)
        ]
        batching = [
            (
                i,
                data.draw(st.integers(1, 8)),
                data.draw(st.integers(0, 3)),
                data.draw(st.integers(0, 8)),
            )
            for i in range(n)
        ]
        devices = [(i, data.draw(st.integers(0, 2))) for i in range(n)]
        tables = []
        for m in (_scoring_py, _scoring_c):
            t = m.ScoreTable(
                n, n_kinds, seed=seed, tau=tau, weight=weight, harm_weight=harm_weight,
                co_slow=co_slow,
            )  # fmt: skip
            for cell in cells:
                t.set_capability(*cell)
            for i, req, tok in priors:
                t.observe(i, req, tok, 0.0)
            for i, slots, queued, busy in batching:
                t.set_slots(i, slots)
                t.set_load(i, queued, busy)
            for i, device in devices:
                t.set_device(i, device)
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

    @rule(i=st_index, device=st_device)
    def set_device(self, i: Any, device: Any) -> None:
        self.both("set_device", i, device)

    @rule(i=st_index, co_slow=st_co_slow)
    def set_co_slow(self, i: Any, co_slow: Any) -> None:
        self.both("set_co_slow", i, co_slow)

    @rule(i=st_index, util=st.one_of(st.floats(0.0, 1.0), st_real))
    def set_util(self, i: Any, util: Any) -> None:
        self.both("set_util", i, util)

    @rule(i=st_index, slots=st_slots)
    def set_slots(self, i: Any, slots: Any) -> None:
        self.both("set_slots", i, slots)

    @rule(i=st_index, slope=st_slope)
    def set_step_slope(self, i: Any, slope: Any) -> None:
        self.both("set_step_slope", i, slope)

    @rule(
        i=st_index,
        req=st_real,
        tok=st_real,
        now=st.one_of(st.floats(0.0, 100.0), st_real),
        busy=st.none() | st_count,
    )
    def observe(self, i: Any, req: Any, tok: Any, now: Any, busy: Any) -> None:
        if busy is None:
            self.both("observe", i, req, tok, now)
        else:
            self.both("observe", i, req, tok, now, busy=busy)

    @rule(
        tau=st.one_of(st.none(), st.floats(0.01, 50.0), st_real),
        weight=st.none() | st_real,
        harm_weight=st.none() | st.just(0.0) | st_real,
    )
    def set_params(self, tau: Any, weight: Any, harm_weight: Any) -> None:
        self.both("set_params", tau=tau, weight=weight, harm_weight=harm_weight)

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

    @invariant()
    def same_state(self) -> None:
        if self.tables[0] is not None:
            assert snapshot(self.tables[0]) == snapshot(self.tables[1])

    @invariant()
    def costs_follow_the_formula(self) -> None:
        """After every step, whatever order the setters ran in: the per-row values and the
        per-device sums a decision reads are current, equal to the last bit to a recomputation
        from scratch. (A decision moves both tables' rotations alike.)"""
        py, c = self.tables
        if py is None:
            return
        est = 100.0  # large enough that the per-token term shows
        for kind in range(py.n_kinds):
            costs = [[0.0] * py.n, [0.0] * py.n]
            assert py.choose(kind, est, costs[0]) == c.choose(kind, est, costs[1])
            assert costs[0] == costs[1]
            assert costs[0] == costs_from_scratch(py, kind, est)
            assert costs[1] == costs_from_scratch(c, kind, est)
            rows = rows_of_table(py, kind)
            want = documented_costs(rows, py.weight, py.harm_weight, est)
            assert costs[0] == pytest.approx(want, rel=1e-9)


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
    want = documented_costs(rows_of_state(state, kind), state.weight, state.harm_weight, est)
    assert costs == pytest.approx(want, rel=1e-12)
    assert costs == costs_from_scratch(t, kind, est)


@given(state=table_states(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_without_harm_or_co_load_the_cost_is_the_selfish_one_to_the_last_bit(
    kernel: ModuleType, state: TableState, kind: int, est: float
) -> None:
    """``harm_weight = 0`` and ``co_slow = 0`` on every row: the cost before devices were
    modelled, bit for bit, whatever the devices and loads."""
    kind %= state.n_kinds
    t = build(kernel, state)
    t.set_params(harm_weight=0.0)
    for i in range(state.n):
        t.set_co_slow(i, 0.0)
    costs = [0.0] * state.n
    t.choose(kind, est, costs)
    assert costs == [old_cost(t, i, kind, est) for i in range(state.n)]


# -- slots: continuous batching -------------------------------------------------------------


@given(state=table_states(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_one_slot_is_the_single_sequence_cost_to_the_last_bit(
    kernel: ModuleType, state: TableState, kind: int, est: float
) -> None:
    """With one slot (a new row's default), no co-load and no harm weight the cost is the one
    before batching, bit for bit, whatever the step slope."""
    kind %= state.n_kinds
    t = build(kernel, state)
    t.set_params(harm_weight=0.0)
    for i in range(state.n):
        t.set_slots(i, 1)
        t.set_co_slow(i, 0.0)
    costs = [0.0] * state.n
    t.choose(kind, est, costs)
    for i, c in enumerate(state.candidates):
        if not (c.capable[kind] and c.available):
            assert costs[i] == INF
            continue
        req, tok = t.ewma(i)
        old = (c.queue + c.in_flight + 1) * (req + est * tok) * contention(c.util, state.weight)
        assert costs[i] == min(old + c.penalty[kind], MAX_COST)


@given(state=table_states(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_a_free_slot_costs_no_wait(
    kernel: ModuleType, state: TableState, kind: int, est: float
) -> None:
    """A request that finds a free slot starts at the next step: its own cost is its service at
    the occupancy it joins (the requests queued ahead of it join the same step)."""
    kind %= state.n_kinds
    t = build(kernel, state)
    t.set_params(harm_weight=0.0)
    for i in range(state.n):
        t.set_co_slow(i, 0.0)
    costs = [0.0] * state.n
    t.choose(kind, est, costs)
    for i, c in enumerate(state.candidates):
        occupancy = c.queue + c.in_flight + 1
        if not (c.capable[kind] and c.available) or occupancy > c.slots:
            continue
        req, tok1 = t.ewma(i)
        service = req + est * (tok1 * (1.0 + c.slope * (occupancy - 1)))
        assert costs[i] == service * contention(c.util, state.weight) + c.penalty[kind]


@given(
    slots=st.integers(1, 16),
    slope=st.floats(0.0, 1.0),
    req=st.floats(0.0, 5.0),
    tok=st.floats(0.0, 0.1),
    util=st.floats(0.0, 1.0),
    weight=st.floats(0.0, 4.0),
    penalty=st.floats(0.0, 2.0),
    est=st.floats(0.0, 4096.0),
    free=st.tuples(st.integers(0, 16), st.integers(0, 16)),
    full=st.tuples(st.integers(0, 16), st.integers(0, 16)),
    seed=st.integers(0, 1),
)
def test_with_equal_estimates_a_free_slot_beats_a_full_context(
    kernel: ModuleType,
    slots: int,
    slope: float,
    req: float,
    tok: float,
    util: float,
    weight: float,
    penalty: float,
    est: float,
    free: tuple[int, int],
    full: tuple[int, int],
    seed: int,
) -> None:
    """Two rows alike in everything but load (each on a device of its own): one with a free slot
    (queued + busy < slots), one without. The free one never costs more, and wins whenever it
    costs less."""
    queued, busy = free[0] % slots, free[1] % slots
    if queued + busy >= slots:
        queued = slots - 1 - busy
    t = kernel.ScoreTable(2, 1, seed=seed, weight=weight)
    t.set_device(1, 1)
    for i in range(2):
        t.set_capability(i, 0, True, penalty)
        t.set_slots(i, slots)
        t.set_step_slope(i, slope)
        t.observe(i, req, tok, 0.0)
        t.set_util(i, util)
    t.set_load(0, queued, busy)
    t.set_load(1, full[0], slots + full[1] - min(full[0], slots))  # queued + busy >= slots
    costs = [0.0, 0.0]
    choice = t.choose(0, est, costs)
    assert costs[0] <= costs[1]
    if costs[0] < costs[1]:
        assert choice == 0


def test_a_model_with_free_slots_is_not_mistaken_for_a_busy_one(kernel: ModuleType) -> None:
    """Three of four slots busy: the next request runs at once, at a 4-sequence step time.
    (Its own completion only: no harm to others is priced here.)"""
    t = kernel.ScoreTable(2, 1, harm_weight=0.0, co_slow=0.0)
    for i in range(2):
        t.set_capability(i, 0, True)
        t.set_slots(i, 4)
        t.set_step_slope(i, 0.25)
        t.observe(i, 0.5, 0.01, 0.0)
    t.set_load(0, 0, 3)  # a free slot: 0.5 + 100 * 0.01 * 1.75
    t.set_load(1, 1, 4)  # full, one queued: two ahead, drained 4 per full step
    costs = [0.0, 0.0]
    assert [t.choose(0, 100.0, costs) for _ in range(3)] == [0, 0, 0]
    assert costs[0] == pytest.approx(2.25)
    assert costs[1] == pytest.approx(6 / 4 * 2.25)
    t.set_load(0, 0, 0)  # idle: one sequence
    t.choose(0, 100.0, costs)
    assert costs[0] == pytest.approx(1.5)


@pytest.mark.parametrize("field", ["queue", "in_flight"], ids=str)
@given(
    slots=st.integers(1, MAX_SLOTS),
    slope=st.floats(0.0, MAX_STEP_SLOPE),
    req=st.floats(0.0, 5.0),
    tok=st.floats(0.0, 0.1),
    est=st.floats(0.0, 4096.0),
    start=st.integers(0, 300),
    co_slow=st.floats(0.0, MAX_CO_SLOW),
    neighbour=st.none() | st.tuples(st.integers(0, 9), st.floats(0.0, MAX_CO_SLOW)),
    harm_weight=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 10.0),
)
def test_cost_is_non_decreasing_in_queued_and_busy_across_the_slots(
    kernel: ModuleType,
    field: str,
    slots: int,
    slope: float,
    req: float,
    tok: float,
    est: float,
    start: int,
    co_slow: float,
    neighbour: tuple[int, float] | None,
    harm_weight: float,
) -> None:
    """One request at a time, through free slots, the full context and the queue behind it;
    idle to busy as well, on a device of its own or beside a busy model."""
    t = kernel.ScoreTable(2, 1, harm_weight=harm_weight, co_slow=co_slow)
    t.set_capability(0, 0, True)
    t.set_slots(0, slots)
    t.set_step_slope(0, slope)
    t.observe(0, req, tok, 0.0)
    if neighbour is None:
        t.set_device(1, 1)
    else:
        t.set_slots(1, 4)
        t.set_load(1, 0, neighbour[0])
        t.set_co_slow(1, neighbour[1])
    costs = [0.0, 0.0]
    previous = 0.0
    counts = range(max(start, 1), start + slots + 3)
    loads = [(c, 1) for c in counts] if field == "queue" else [(1, c) for c in counts]
    for queued, busy in [(0, 0), (0, 1), *loads]:  # each one more than the one before
        t.set_load(0, queued, busy)
        t.choose(0, est, costs)
        assert costs[0] >= previous
        previous = costs[0]


@given(
    slots=st.integers(1, MAX_SLOTS),
    slope=st.floats(0.0, MAX_STEP_SLOPE),
    per_request=st.floats(0.0, 1e6),
    per_token=st.floats(0.0, 10.0),
    busy=st.integers(0, 2 * MAX_SLOTS),
)
def test_observe_normalises_the_per_token_time_to_one_sequence(
    kernel: ModuleType, slots: int, slope: float, per_request: float, per_token: float, busy: int
) -> None:
    t = kernel.ScoreTable(2, 1, harm_weight=0.0)
    t.set_slots(1, slots)
    t.set_step_slope(1, slope)
    t.observe(1, per_request, per_token, 3.0, busy=busy)
    k = min(max(busy, 1), slots)  # clamped to the context's slots
    assert t.ewma(1) == (per_request, per_token / (1.0 + slope * (k - 1)))
    # Observed at its own occupancy, a row costs what was measured there.
    t.set_capability(1, 0, True)
    t.set_load(1, 0, k - 1)
    costs = [0.0, 0.0]
    t.choose(0, 1.0, costs)
    assert costs[1] == pytest.approx(per_request + per_token, rel=1e-12)


def test_observe_at_one_sequence_is_unchanged_and_a_slope_change_keeps_past_estimates(
    kernel: ModuleType,
) -> None:
    t = kernel.ScoreTable(1, 1)
    t.set_slots(0, 8)
    t.observe(0, 0.2, 0.03, 1.0)  # busy defaults to 1: taken as is
    assert t.ewma(0) == (0.2, 0.03)
    t.set_step_slope(0, 0.5)
    assert t.ewma(0) == (0.2, 0.03)
    t.observe(0, 0.2, 0.06, 1.0, busy=3)  # 0.06 / 2 = 0.03 at one sequence: no peak
    assert t.ewma(0) == (0.2, 0.03)


def test_a_servable_candidate_with_an_overflowing_cost_is_still_chosen(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(3, 1, weight=1e308)
    t.set_capability(1, 0, True)
    t.set_util(1, 1.0)  # contention overflows to inf; with zero estimates inf * 0 is NaN
    costs = [0.0] * 3
    assert t.choose(0, 0.0, costs) == 1
    assert costs == [INF, MAX_COST, INF]

    t.set_params(weight=1.0)
    t.observe(1, 1e308, 1e308, 0.0)
    t.set_load(1, 2**31 - 1, 2**31 - 1)
    assert t.choose(0, 4096.0, costs) == 1
    assert costs == [INF, MAX_COST, INF]

    t.set_slots(1, MAX_SLOTS)  # and with the largest step time
    t.set_step_slope(1, MAX_STEP_SLOPE)
    assert t.choose(0, 0.0, costs) == 1
    assert costs == [INF, MAX_COST, INF]


@pytest.mark.parametrize(
    "field",
    [
        "queue", "in_flight", "req", "tok", "slope", "util", "penalty", "est", "co_slow",
        "harm_weight", "mate_in_flight", "mate_co_slow",
    ],
    ids=str,
)  # fmt: skip
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
    """More of anything a row's cost grows with never lowers it: its own load (idle to busy
    included), estimates, utilisation, penalty, co-load slowdown, the harm weight, and the load
    or slowdown of another row on its device."""
    kind %= state.n_kinds
    i = data.draw(st.integers(0, state.n - 1))
    j = data.draw(st.integers(0, state.n - 1))  # the mate: moved onto i's device
    t = build(kernel, state)
    c, mate = state.candidates[i], state.candidates[j]
    if field.startswith("mate_"):
        t.set_device(j, c.device)
    costs = [0.0] * state.n

    def cost(est: float) -> float:
        t.choose(kind, est, costs)
        return costs[i]

    before = cost(est)
    if field == "queue":
        t.set_load(i, c.queue + int(more), c.in_flight)
    elif field == "in_flight":
        t.set_load(i, c.queue, c.in_flight + int(more))
    elif field in ("req", "tok"):  # a peak: taken at once
        t.observe(i, c.req + more * (field == "req"), c.tok + more * (field == "tok"), 0.0)
    elif field == "slope":
        t.set_step_slope(i, min(MAX_STEP_SLOPE, c.slope + more))
    elif field == "util":
        t.set_util(i, min(1.0, c.util + more))
    elif field == "penalty":
        t.set_capability(i, kind, c.capable[kind], c.penalty[kind] + more)
    elif field == "co_slow":
        t.set_co_slow(i, min(MAX_CO_SLOW, c.co_slow + more))
    elif field == "harm_weight":
        t.set_params(harm_weight=state.harm_weight + more)
    elif field == "mate_in_flight":  # i itself when j == i: its own load
        queued, busy = t.load(j)
        t.set_load(j, queued, busy + int(more))
    elif field == "mate_co_slow":
        t.set_co_slow(j, min(MAX_CO_SLOW, mate.co_slow + more))
    else:
        est += more
    assert cost(est) >= before


@given(state=table_states(), data=st.data(), kind=st.integers(0, 2), est=st.floats(0.0, 4096.0))
def test_a_row_on_another_device_changes_nothing(
    kernel: ModuleType, state: TableState, data: st.DataObject, kind: int, est: float
) -> None:
    """Load and slowdown on one device leave the costs of rows on other devices as they were,
    to the last bit."""
    kind %= state.n_kinds
    j = data.draw(st.integers(0, state.n - 1))
    t = build(kernel, state)
    t.set_device(j, 1000)  # a device of its own
    costs, after = [0.0] * state.n, [0.0] * state.n
    t.choose(kind, est, costs)
    t.set_load(j, data.draw(st.integers(0, 20)), data.draw(st.integers(0, 20)))
    t.set_co_slow(j, data.draw(st.floats(0.0, MAX_CO_SLOW)))
    t.choose(kind, est, after)
    assert [a for i, a in enumerate(after) if i != j] == [c for i, c in enumerate(costs) if i != j]


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
        t.observe(i, 0.5, 0.01, 0.0)
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
    assert (t.n, t.n_kinds, t.tau, t.weight, t.harm_weight) == (2, 3, 5.0, 1.0, 1.0)
    assert (t.device(1), t.co_slow(1)) == (0, DEFAULT_CO_SLOW)  # every row on one device
    assert kernel.ScoreTable(2, 1, co_slow=0.25).co_slow(1) == 0.25
    assert t.load(1) == (0, 0)
    assert t.ewma(1) == (0.0, 0.0)
    assert t.util(1) == 0.0
    assert t.available(1) is True
    assert t.capability(1, 2) == (False, 0.0)
    assert t.slots(1) == 1  # one request at a time until the actor says otherwise
    assert t.step_slope(1) == DEFAULT_STEP_SLOPE
    assert t.choose(0, 1.0) == NO_CANDIDATE  # nothing is capable until told so


def test_both_kernels_export_the_same_constants() -> None:
    for name in _scoring_py.__all__:
        if name != "ScoreTable":
            assert getattr(_scoring_c, name) == getattr(_scoring_py, name), name
    assert sorted(_scoring_c.__all__) == sorted(_scoring_py.__all__)
    assert (MAX_SLOTS, DEFAULT_STEP_SLOPE) == (256, 0.15)
    assert (DEFAULT_CO_SLOW, MAX_CO_SLOW, QUANTUM) == (0.5, 10.0, 2.0**-20)


def test_accepts_numpy_scalars(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(2, 1)
    t.set_capability(np.int64(1), np.int32(0), np.bool_(True), np.float32(0.5))
    t.set_load(np.int64(1), np.int64(2), np.uint8(1))
    t.set_util(np.int64(1), np.float64(0.25))
    t.set_slots(np.int64(1), np.uint8(4))
    t.set_step_slope(np.int64(1), np.float32(0.5))
    t.observe(np.int64(1), np.float64(0.5), np.float32(0.25), np.int8(1), busy=np.int16(3))
    t.set_device(np.int64(1), np.uint8(3))
    t.set_co_slow(np.int64(1), np.float32(0.75))
    t.set_params(harm_weight=np.float32(0.5))
    assert t.choose(np.int64(0), np.float32(8.0)) == 1
    assert t.load(1) == (2, 1)
    assert (t.slots(1), t.step_slope(1), t.ewma(1)) == (4, 0.5, (0.5, 0.125))
    assert (t.device(1), t.co_slow(1), t.harm_weight) == (3, 0.75, 0.5)


# -- validation ---------------------------------------------------------------------------------


def _table(kernel: ModuleType) -> Any:
    t = kernel.ScoreTable(3, 2, seed=1)
    for i in range(3):
        t.set_capability(i, 0, True, 0.1 * i)
        t.set_slots(i, i + 1)
        t.observe(i, 0.2, 0.01, 1.0, busy=i + 1)
        t.set_load(i, i, 1)
        t.set_co_slow(i, 0.25 * i)
    t.set_device(2, 5)
    return t


BAD_CALLS: list[tuple[str, Callable[..., Any]]] = []
for _bad in BAD_REALS:
    BAD_CALLS += [
        (f"choose est {_bad!r}", lambda t, b=_bad: t.choose(0, b)),
        (f"penalty {_bad!r}", lambda t, b=_bad: t.set_capability(0, 0, True, b)),
        (f"util {_bad!r}", lambda t, b=_bad: t.set_util(0, b)),
        (f"observe req {_bad!r}", lambda t, b=_bad: t.observe(0, b, 0.1, 2.0)),
        (f"observe tok {_bad!r}", lambda t, b=_bad: t.observe(0, 0.1, b, 2.0)),
        (f"observe now {_bad!r}", lambda t, b=_bad: t.observe(0, 0.1, 0.1, b)),
        (f"co_slow {_bad!r}", lambda t, b=_bad: t.set_co_slow(0, b)),
    ]
    if _bad is not None:  # None means "unchanged" to set_params
        BAD_CALLS += [
            (f"tau {_bad!r}", lambda t, b=_bad: t.set_params(tau=b, weight=2.0)),
            (f"weight {_bad!r}", lambda t, b=_bad: t.set_params(tau=1.0, weight=b)),
            (
                f"harm_weight {_bad!r}",
                lambda t, b=_bad: t.set_params(tau=1.0, weight=2.0, harm_weight=b),
            ),
        ]
for _bad in BAD_COUNTS:
    BAD_CALLS += [
        (f"queue {_bad!r}", lambda t, b=_bad: t.set_load(0, b, 0)),
        (f"in_flight {_bad!r}", lambda t, b=_bad: t.set_load(0, 0, b)),
        (f"device {_bad!r}", lambda t, b=_bad: t.set_device(0, b)),
    ]
for _bad in [MAX_CO_SLOW * (1 + 1e-15), 11, 10**400]:
    BAD_CALLS += [(f"co_slow {_bad!r}", lambda t, b=_bad: t.set_co_slow(0, b))]
for _bad in [*BAD_REALS, MAX_STEP_SLOPE * (1 + 1e-15), 11]:
    BAD_CALLS += [(f"step slope {_bad!r}", lambda t, b=_bad: t.set_step_slope(0, b))]
for _bad in [0, -1, MAX_SLOTS + 1, True, 1.0, 4.0, None, "1", 2**70, np.int64(0)]:
    BAD_CALLS += [(f"slots {_bad!r}", lambda t, b=_bad: t.set_slots(0, b))]
for _bad in BAD_COUNTS:
    BAD_CALLS += [(f"observe busy {_bad!r}", lambda t, b=_bad: t.observe(0, 0.1, 0.1, 2.0, b))]
for _bad in [-1, 3, True, 1.0, None, "0", 2**70]:
    BAD_CALLS += [
        (f"index {_bad!r} slots", lambda t, b=_bad: t.set_slots(b, 2)),
        (f"index {_bad!r} step slope", lambda t, b=_bad: t.set_step_slope(b, 0.1)),
        (f"index {_bad!r} slots getter", lambda t, b=_bad: t.slots(b)),
        (f"index {_bad!r}", lambda t, b=_bad: t.set_available(b, False)),
        (f"index {_bad!r} getter", lambda t, b=_bad: t.load(b)),
        (f"index {_bad!r} observe", lambda t, b=_bad: t.observe(b, 0.1, 0.1, 2.0)),
        (f"index {_bad!r} device", lambda t, b=_bad: t.set_device(b, 1)),
        (f"index {_bad!r} co_slow", lambda t, b=_bad: t.set_co_slow(b, 0.5)),
        (f"index {_bad!r} device getter", lambda t, b=_bad: t.device(b)),
        (f"index {_bad!r} co_slow getter", lambda t, b=_bad: t.co_slow(b)),
    ]
for _bad in [-1, 2, True, 1.0, None]:
    BAD_CALLS += [
        (f"kind {_bad!r}", lambda t, b=_bad: t.choose(b, 1.0)),
        (f"kind {_bad!r} capability", lambda t, b=_bad: t.set_capability(0, b, True)),
        (f"kind {_bad!r} getter", lambda t, b=_bad: t.capability(0, b)),
    ]
BAD_CALLS += [
    ("util above 1", lambda t: t.set_util(0, 1.0000001)),
    ("tau zero", lambda t: t.set_params(tau=0.0)),
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
        ((2, 1), {"harm_weight": -0.5}),
        ((2, 1), {"harm_weight": math.nan}),
        ((2, 1), {"co_slow": -0.5}),
        ((2, 1), {"co_slow": 11.0}),
        ((2, 1), {"co_slow": "0.5"}),
    ],
    ids=repr,
)
def test_invalid_table_shape_or_parameters_raise(
    kernel: ModuleType, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(KernelInputError):
        kernel.ScoreTable(*args, **kwargs)


def test_contention_multiplies_the_expected_service(kernel: ModuleType) -> None:
    t = kernel.ScoreTable(1, 1)
    t.set_capability(0, 0, True)
    t.observe(0, 1.0, 0.0, 0.0)  # one second per request: the cost is the contention factor
    costs = [0.0]

    def factor(util: float) -> float:
        t.set_util(0, util)
        t.choose(0, 0.0, costs)
        return costs[0]

    assert factor(0.0) == 1.0
    assert factor(0.5) == 2.0
    assert factor(1.0) == factor(0.95) == pytest.approx(20.0)  # clamped below the pole
    t.set_params(weight=0.0)
    assert factor(0.5) == 1.0


# -- devices: what a choice does to others ------------------------------------------------------


def _three_on_two_devices(kernel: ModuleType, **kwargs: float) -> Any:
    """Rows 0 and 1 share device 0 (say, the CPU); row 2 is alone on device 1. All alike:
    0.5 s per request, 10 ms per token, 4 slots, slope 0.2."""
    t = kernel.ScoreTable(3, 1, **kwargs)
    for i in range(3):
        t.set_capability(i, 0, True)
        t.set_slots(i, 4)
        t.set_step_slope(i, 0.2)
        t.observe(i, 0.5, 0.01, 0.0)
    t.set_device(2, 1)
    return t


def test_an_idle_model_beside_a_busy_one_costs_more_than_its_selfish_cost(
    kernel: ModuleType,
) -> None:
    """Row 0 runs four sequences. Row 1, idle on the same device, would slow them down (and be
    slowed by them); row 2, idle on a device of its own, costs what it did before devices were
    modelled, and wins."""
    t = _three_on_two_devices(kernel, co_slow=1.0)
    t.set_load(0, 0, 4)
    costs = [0.0] * 3
    assert t.choose(0, 100.0, costs) == 2
    service = 0.5 + 100.0 * 0.01  # one sequence: 1.5 s
    assert costs[2] == service
    # own: 1.5 s, twice as long beside one busy model; device: 4 sequences, each slowed by
    # 1.0 for 1.5 s.
    assert costs[1] == pytest.approx(2 * service + 4 * 1.0 * service)
    selfish = _three_on_two_devices(kernel, co_slow=0.0, harm_weight=0.0)
    selfish.set_load(0, 0, 4)
    selfish.choose(0, 100.0, costs)
    assert costs[1] == costs[2] == service


def test_harm_weight_scales_only_the_harm(kernel: ModuleType) -> None:
    costs = {}
    for weight in (0.0, 1.0, 2.0):
        t = _three_on_two_devices(kernel, harm_weight=weight)
        t.set_load(0, 1, 2)
        t.set_load(1, 0, 1)
        costs[weight] = [0.0] * 3
        t.choose(0, 64.0, costs[weight])
    for i in range(3):
        harm = costs[1.0][i] - costs[0.0][i]
        assert costs[2.0][i] - costs[0.0][i] == pytest.approx(2 * harm)
    assert costs[1.0][2] == costs[0.0][2]  # alone and idle: nothing to harm
    assert costs[1.0][0] > costs[0.0][0]  # row 0 slows its own batch and row 1


def test_a_busy_model_pays_for_the_batch_it_slows(kernel: ModuleType) -> None:
    """One more sequence beside ``k - 1`` running ones makes each of their steps ``tok * slope``
    longer, for about half of its own tokens."""
    t = _three_on_two_devices(kernel, co_slow=0.0)
    t.set_load(2, 0, 3)
    costs = [0.0] * 3
    t.choose(0, 100.0, costs)
    own = 0.5 + 100.0 * 0.01 * (1 + 0.2 * 3)
    assert costs[2] == pytest.approx(own + 3 * 100.0 / 2 * 0.01 * 0.2)
    t.set_load(2, 5, 3)  # queued behind a full context: it runs beside 3 others later
    t.choose(0, 100.0, costs)
    assert costs[2] == pytest.approx(9 / 4 * own + 3 * 100.0 / 2 * 0.01 * 0.2)


def _spill_point(kernel: ModuleType, same_device: bool) -> int:
    """Requests queued on a busy coder before a 4x slower model takes the next one."""
    t = kernel.ScoreTable(2, 1, co_slow=1.0)  # two models halve each other's speed (2 cores)
    t.set_device(1, 0 if same_device else 1)
    for i, (req, tok) in enumerate([(0.05, 0.01), (0.2, 0.04)]):
        t.set_capability(i, 0, True)
        t.set_slots(i, 4)
        t.observe(i, req, tok, 0.0)
    for queued in range(1000):
        t.set_load(0, queued, 4)
        if t.choose(0, 100.0) == 1:
            return queued
    return 1000


def test_spilling_onto_a_model_that_shares_the_device_waits_for_a_longer_queue(
    kernel: ModuleType,
) -> None:
    """The surge the issue measured: code arrives faster than the coder serves it. A slower
    model on its own device takes the excess early; one on the same cores would slow the coder
    down as well, so it is used only when the coder's queue is far longer."""
    apart, together = _spill_point(kernel, False), _spill_point(kernel, True)
    assert apart < together < 1000
    assert together >= 3 * apart


@given(co_slow=st.floats(0.0, MAX_CO_SLOW))
def test_co_slow_is_stored_to_the_nearest_quantum(kernel: ModuleType, co_slow: float) -> None:
    t = kernel.ScoreTable(1, 1, co_slow=co_slow)
    assert t.co_slow(0) == quantized(co_slow)
    assert abs(t.co_slow(0) - co_slow) <= QUANTUM / 2
    t.set_co_slow(0, co_slow)
    assert t.co_slow(0) == quantized(co_slow)
    assert (t.co_slow(0) / QUANTUM).is_integer()


def test_device_ids_are_any_count_and_are_reused(kernel: ModuleType) -> None:
    """Rows move between devices freely; an emptied device's numbers are reused, and a device
    that empties and fills again starts from zero."""
    t = kernel.ScoreTable(3, 1, co_slow=1.0)
    for i in range(3):
        t.set_capability(i, 0, True)
        t.set_slots(i, 4)
        t.observe(i, 1.0, 0.0, 0.0)
    t.set_load(0, 0, 1)
    costs = [0.0] * 3
    for device in [MAX_COUNT, 5, 0, 5, MAX_COUNT, 0]:
        for i in (1, 0, 2):  # row 0 carries its busy share along
            t.set_device(i, device)
            t.set_device(i, device)  # the same device again: nothing changes
        assert [t.device(i) for i in range(3)] == [device] * 3
        t.choose(0, 0.0, costs)
        assert costs == [1.0, 2.0 + 1.0, 2.0 + 1.0]  # others x2, plus row 0's harm
    t.set_device(0, 9)
    t.choose(0, 0.0, costs)
    assert costs == [1.0, 1.0, 1.0]


# -- peak EWMA ----------------------------------------------------------------------------------

nonneg = st.floats(0.0, 1e6)


def peak_ewma(kernel: ModuleType, old: float, sample: float, dt: float, tau: float) -> float:
    """One peak-EWMA step through a table: ``old`` observed at time 10, ``sample`` at ``10 + dt``."""
    t = kernel.ScoreTable(1, 1, tau=tau)
    t.observe(0, old, 0.0, 10.0)
    t.observe(0, sample, 0.0, 10.0 + dt)
    return float(t.ewma(0)[0])


@given(per_request=nonneg, per_token=st.floats(0.0, 10.0), now=st.floats(0.0, 1e6))
def test_a_first_observation_sets_the_estimates_exactly(
    kernel: ModuleType, per_request: float, per_token: float, now: float
) -> None:
    """What lets a caller seed a new table with priors."""
    t = kernel.ScoreTable(2, 1)
    t.observe(1, per_request, per_token, now)
    assert t.ewma(1) == (per_request, per_token)
    assert t.ewma(0) == (0.0, 0.0)


@given(old=nonneg, sample=nonneg, dt=st.floats(-10.0, 1e3), tau=st.floats(1e-3, 1e3))
def test_peak_ewma_follows_peaks_up_at_once(
    kernel: ModuleType, old: float, sample: float, dt: float, tau: float
) -> None:
    new = peak_ewma(kernel, old, sample, dt, tau)
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
    base = peak_ewma(kernel, old, sample, dt, tau)
    slack = 1e-12 * max(old, sample)  # rounding of the blend
    assert peak_ewma(kernel, old, sample, dt + more, tau) <= base + slack
    assert peak_ewma(kernel, old, sample, dt, tau + more) >= base - slack


def test_peak_ewma_decays_with_time_constant_tau(kernel: ModuleType) -> None:
    assert peak_ewma(kernel, 1.0, 0.0, 2.0, 2.0) == pytest.approx(math.exp(-1.0))
    assert peak_ewma(kernel, 3.0, 1.0, 4.0, 2.0) == pytest.approx(1.0 + 2.0 * math.exp(-2.0))
    assert peak_ewma(kernel, 3.0, 1.0, 1e9, 2.0) == pytest.approx(1.0)


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
        t.observe(0, 4.0, 0.0, 0.0)
        t.observe(0, 0.0, 0.0, 1.0)
    assert fast.ewma(0)[0] == pytest.approx(4.0 * math.exp(-1.0))
    assert slow.ewma(0)[0] == pytest.approx(4.0 * math.exp(-0.1))


# -- hostile inputs: callbacks that mutate the inputs --------------------------------------------
# Python code run while a call is under way (a finaliser) may shrink the costs list after its
# length was checked. The compiled kernel is built with boundscheck off, so this crashed it;
# both kernels must raise the reference's IndexError instead.


def test_choose_survives_a_costs_list_shrunk_by_a_finaliser(kernel: ModuleType) -> None:
    costs: list[Any] = []

    class EmptiesCostsWhenDropped:
        def __del__(self) -> None:
            costs.clear()

    costs.extend([EmptiesCostsWhenDropped(), 0.0, 0.0])
    with pytest.raises(IndexError):
        _table(kernel).choose(0, 1.0, costs)


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
