"""The actor mailbox: priority order, FIFO within a class, aging, bounds, removal, closing."""

from __future__ import annotations

import math

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeta._mailbox import PriorityMailbox

HIGH, NORMAL, LOW = 0, 1, 2


def drain_all(mb: PriorityMailbox[str], now: float = 0.0) -> list[str]:
    out = []
    while len(mb):
        out.append(mb.pop_nowait(now))
    return out


def test_higher_priority_first_fifo_within_class() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(10, aging_s=math.inf)
    for item, prio in [
        ("l1", LOW),
        ("n1", NORMAL),
        ("h1", HIGH),
        ("l2", LOW),
        ("h2", HIGH),
        ("n2", NORMAL),
    ]:
        mb.put_nowait(item, prio, 0.0)
    assert drain_all(mb) == ["h1", "h2", "n1", "n2", "l1", "l2"]


def test_aging_lets_a_waiting_low_request_overtake() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(10, aging_s=1.0)
    mb.put_nowait("old-low", LOW, 0.0)
    mb.put_nowait("new-high", HIGH, 2.5)
    # At t=2.5 the LOW item has waited 2.5 s: rank 2 - 2.5 = -0.5 beats HIGH's 0 - 0 = 0.
    assert mb.pop_nowait(2.5) == "old-low"
    assert mb.pop_nowait(2.5) == "new-high"


def test_aging_not_yet_enough_keeps_priority_order() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(10, aging_s=1.0)
    mb.put_nowait("low", LOW, 0.0)
    mb.put_nowait("high", HIGH, 1.0)
    # LOW rank 2 - 1.5 = 0.5 vs HIGH rank 0 - 0.5 = -0.5.
    assert mb.pop_nowait(1.5) == "high"


def test_equal_rank_goes_to_the_older_item() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(10, aging_s=1.0)
    mb.put_nowait("normal", NORMAL, 0.0)
    mb.put_nowait("high", HIGH, 1.0)
    # Both rank 0 at t=1: the NORMAL item arrived first.
    assert mb.pop_nowait(1.0) == "normal"


def test_no_starvation_under_a_steady_stream_of_high_priority() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(100, aging_s=1.0)
    mb.put_nowait("low", LOW, 0.0)
    served = []
    for t in range(10):
        mb.put_nowait(f"high{t}", HIGH, float(t))
        served.append(mb.pop_nowait(float(t)))
    assert "low" in served


def test_bounded() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(2)
    mb.put_nowait("a", NORMAL, 0.0)
    mb.put_nowait("b", LOW, 0.0)
    assert mb.full
    with pytest.raises(anyio.WouldBlock):
        mb.put_nowait("c", HIGH, 0.0)
    assert mb.pop_nowait(0.0) == "a"
    assert not mb.full
    mb.put_nowait("c", HIGH, 0.0)
    assert len(mb) == 2


def test_remove_takes_an_item_back() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(3)
    ta = mb.put_nowait("a", NORMAL, 0.0)
    mb.put_nowait("b", NORMAL, 0.0)
    assert mb.remove(ta) is True
    assert mb.remove(ta) is False
    assert len(mb) == 1
    assert drain_all(mb) == ["b"]
    with pytest.raises(anyio.WouldBlock):
        mb.pop_nowait(0.0)


def test_close_returns_queued_items_in_arrival_order() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(5)
    mb.put_nowait("low", LOW, 0.0)
    mb.put_nowait("high", HIGH, 0.0)
    mb.put_nowait("normal", NORMAL, 0.0)
    assert mb.close() == ["low", "high", "normal"]
    assert len(mb) == 0 and mb.closed
    with pytest.raises(anyio.ClosedResourceError):
        mb.put_nowait("x", NORMAL, 0.0)
    with pytest.raises(anyio.EndOfStream):
        mb.pop_nowait(0.0)


def test_drain_empties_but_stays_open() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(5)
    mb.put_nowait("a", LOW, 0.0)
    mb.put_nowait("b", HIGH, 0.0)
    assert mb.drain() == ["a", "b"]
    mb.put_nowait("c", NORMAL, 0.0)
    assert drain_all(mb) == ["c"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity": 0},
        {"capacity": True},
        {"capacity": 1, "aging_s": 0.0},
        {"capacity": 1, "classes": 0},
    ],
)
def test_invalid_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PriorityMailbox(**kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_receive_waits_for_an_item() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(2)
    got: list[str] = []

    async def consumer() -> None:
        got.append(await mb.receive(lambda: 0.0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        mb.put_nowait("x", NORMAL, 0.0)
    assert got == ["x"]


@pytest.mark.anyio
async def test_close_wakes_a_waiting_receiver_with_end_of_stream() -> None:
    mb: PriorityMailbox[str] = PriorityMailbox(2)
    outcome: list[str] = []

    async def consumer() -> None:
        try:
            await mb.receive(lambda: 0.0)
        except anyio.EndOfStream:
            outcome.append("eos")

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        await anyio.wait_all_tasks_blocked()
        mb.close()
    assert outcome == ["eos"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(0, 2)),
            st.tuples(st.just("pop"), st.just(0)),
            st.tuples(st.just("remove"), st.integers(0, 50)),
        ),
        max_size=60,
    )
)
def test_matches_a_reference_model_without_aging(ops: list[tuple[str, int]]) -> None:
    """Against a sorted list: pops return the live item with the smallest (class, arrival)."""
    capacity = 8
    mb: PriorityMailbox[int] = PriorityMailbox(capacity, aging_s=math.inf)
    model: list[tuple[int, int]] = []  # (class, id)
    tickets = {}
    next_id = 0
    for op, arg in ops:
        if op == "put":
            if len(model) >= capacity:
                with pytest.raises(anyio.WouldBlock):
                    mb.put_nowait(-1, arg, 0.0)
                continue
            tickets[next_id] = mb.put_nowait(next_id, arg, 0.0)
            model.append((arg, next_id))
            next_id += 1
        elif op == "pop":
            if not model:
                with pytest.raises(anyio.WouldBlock):
                    mb.pop_nowait(0.0)
                continue
            expected = min(model)
            model.remove(expected)
            assert mb.pop_nowait(0.0) == expected[1]
        else:
            live = {i for _, i in model}
            removed = mb.remove(tickets[arg]) if arg in tickets else False
            assert removed == (arg in live)
            model = [(c, i) for c, i in model if i != arg]
        assert len(mb) == len(model)
