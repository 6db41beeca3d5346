"""The seeded workload generators in zeta.testing._workloads: deterministic, sorted, and shaped
as their docstrings say (kinds, priorities, burst windows, fan-out groups)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest

from zeta import HeuristicClassifier, Kind, Priority
from zeta.testing._workloads import (
    _CODE,
    _REASON,
    SHAPES,
    Arrival,
    agent_fanout,
    bursty,
    make_prompt,
    steady,
)

GENERATORS: dict[str, Callable[[int], list[Arrival]]] = {
    "steady": lambda seed: steady(60.0, 4.0, seed=seed),
    "bursty": lambda seed: bursty(60.0, 2.0, seed=seed),
    "agent_fanout": lambda seed: agent_fanout(60.0, seed=seed),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_same_seed_same_workload_other_seed_another(name: str) -> None:
    make = GENERATORS[name]
    assert make(7) == make(7)
    assert make(7) != make(8)


@pytest.mark.parametrize("name", GENERATORS)
def test_sorted_within_duration_and_shaped(name: str) -> None:
    arrivals = GENERATORS[name](3)
    assert arrivals, "a minute of traffic is never empty"
    times = [a.at for a in arrivals]
    assert times == sorted(times)
    assert all(0.0 <= t < 60.0 for t in times)
    for a in arrivals:
        assert a.kind is not Kind.AUTO
        assert a.prompt
        _, _, tlo, thi = SHAPES[a.kind]
        assert tlo <= a.max_tokens <= thi, a


def test_generators_do_not_touch_the_global_rng() -> None:
    random.seed(1)
    expected = random.random()
    random.seed(1)
    steady(10.0, 5.0, seed=2)
    bursty(10.0, 5.0, seed=2)
    agent_fanout(10.0, seed=2)
    assert random.random() == expected


def test_steady_mix_and_rate() -> None:
    arrivals = steady(200.0, 5.0, seed=11)
    assert all(a.priority is Priority.NORMAL for a in arrivals)
    # Poisson count over 200 s at 5/s: mean 1000, sd ~32; the bound is ~6 sd.
    assert 800 <= len(arrivals) <= 1200
    share = Counter(a.kind for a in arrivals)
    for kind, expected in (
        (Kind.SIMPLE, 0.3),
        (Kind.CODE, 0.3),
        (Kind.EMBED, 0.2),
        (Kind.REASON, 0.2),
    ):
        assert abs(share[kind] / len(arrivals) - expected) < 0.06, (kind, share)


def test_steady_honours_a_custom_mix() -> None:
    arrivals = steady(20.0, 5.0, mix={Kind.REASON: 1.0}, seed=0)
    assert arrivals and {a.kind for a in arrivals} == {Kind.REASON}


def test_empty_duration_gives_no_arrivals() -> None:
    assert steady(0.0, 5.0) == []
    assert bursty(0.0, 5.0) == []
    assert agent_fanout(0.0) == []


def test_bursty_surges_are_high_priority_code_inside_their_windows() -> None:
    every, length = 10.0, 4.0
    arrivals = bursty(60.0, 2.0, burst_every=every, burst_len=length, seed=5)
    surge = [a for a in arrivals if a.priority is Priority.HIGH]
    background = [a for a in arrivals if a.priority is not Priority.HIGH]
    assert surge and background
    assert {a.kind for a in surge} == {Kind.CODE}
    for a in surge:
        offset = (a.at - every / 4) % every
        assert a.at >= every / 4 and offset < length, a.at
    # The surge rate (4x the background by default) over 4 s in every 10 s.
    in_windows = sum(length for start in range(6) if start * every + every / 4 < 60.0)
    assert len(surge) / in_windows > 2 * (len(background) / 60.0)


def test_bursty_kind_and_rate_are_configurable() -> None:
    arrivals = bursty(30.0, 1.0, burst_kind=Kind.REASON, burst_rate=20.0, seed=1)
    surge = [a for a in arrivals if a.priority is Priority.HIGH]
    assert {a.kind for a in surge} == {Kind.REASON}


def test_agent_fanout_groups() -> None:
    fanout = 6
    arrivals = agent_fanout(40.0, agents=3, fanout=fanout, think_s=2.0, seed=4)
    assert {a.kind for a in arrivals} == {Kind.REASON, Kind.CODE, Kind.EMBED}
    assert all(a.priority is Priority.LOW for a in arrivals if a.kind is Kind.EMBED)
    assert all(a.priority is Priority.NORMAL for a in arrivals if a.kind is not Kind.EMBED)
    groups = [
        list(g) for _, g in itertools.groupby(
            (a for a in arrivals if a.kind is not Kind.REASON), key=lambda a: a.at
        )
    ]  # fmt: skip
    for group in groups:
        # One agent's fan-out lands at one instant: `fanout` code edits and half as many embeds.
        kinds = Counter(a.kind for a in group)
        assert kinds == {Kind.CODE: fanout, Kind.EMBED: fanout // 2}, kinds
    plans = [a for a in arrivals if a.kind is Kind.REASON]
    # Each plan is followed by its fan-out, unless that fell past the end.
    assert len(plans) - 3 <= len(groups) <= len(plans)
    for group in groups:
        assert any(0.05 <= group[0].at - p.at <= 0.3 + 1e-9 for p in plans)


def test_prompts_carry_the_markers_of_their_kind() -> None:
    rng = random.Random(0)
    for _ in range(50):
        code = make_prompt(rng, Kind.CODE, 12)
        assert any(marker in code for marker in _CODE), code
        reason = make_prompt(rng, Kind.REASON, 12)
        assert reason.startswith(_REASON) and reason.endswith("?"), reason
        assert len(make_prompt(rng, Kind.SIMPLE, 5).split()) == 5


def test_default_classifier_reads_most_prompts_as_their_kind() -> None:
    """So replaying a workload with ``kind="auto"`` routes roughly as the workload intends."""
    classifier = HeuristicClassifier()
    arrivals = steady(100.0, 5.0, mix={Kind.SIMPLE: 1, Kind.CODE: 1, Kind.REASON: 1}, seed=9)
    agree = Counter(a.kind for a in arrivals if classifier.classify(a.prompt).kind is a.kind)
    total = Counter(a.kind for a in arrivals)
    for kind in (Kind.SIMPLE, Kind.CODE, Kind.REASON):
        assert agree[kind] / total[kind] >= 0.6, (kind, agree[kind], total[kind])
