"""Sim-to-real: a trace replayed on the real tiny ladder and in the simulator with the fleet
measured from it agree loosely; the comparison and the trace helpers are exact."""

from __future__ import annotations

import math

import anyio
import numpy as np
import pytest

from zeta import Kind, Scheduler
from zeta._types import KIND_INDEX
from zeta.backends.llama_cpp import LlamaCppBackend
from zeta.sim import SimRequest, scenario, simulate
from zeta.sim._measure import measure_fleet
from zeta.sim._real import (
    KindGap,
    RealRecord,
    RealResult,
    compare,
    exact_lengths,
    prompt_of,
    replay_real,
    stretched,
)
from zeta.testing import ladder_spec

#: How far the simulated p50 of a kind may be from the real one, as a factor either way. On
#: the tiny ladder a decode step takes 0.1-0.3 ms, and the scheduler's own work per request and
#: per step (event loop, thread hand-offs), which the profile measured on the bare backend
#: leaves out, is of the same order on this 2-core host shared with other jobs: over eight runs
#: the real p50s were 1.3-3.2x the simulated ones, and 3.5-6.2x in one run on a busier
#: machine (real slower every time). A factor of 8 passes that, and still fails a broken model:
#: a profile off by an order of magnitude (a unit slip, a model measured in place of another
#: rung two steps away) or a replay that piles requests up instead of submitting them on time;
#: token counts the backend does not honour fail the exact check above it.
P50_FACTOR = 8.0


def test_prompts_have_the_asked_token_count_and_no_shared_prefix() -> None:
    backend = LlamaCppBackend(ladder_spec("coder-tiny"), 0)
    try:
        for tokens in (2, 3, 8, 57, 256):
            # count_tokens leaves out the beginning-of-sequence token that prompt_of counts.
            assert backend.count_tokens(prompt_of(tokens, salt=tokens * 31)) + 1 == tokens
    finally:
        backend.close()
    firsts = {prompt_of(40, salt).split()[0] for salt in range(100)}
    assert len(firsts) == 100
    assert len({prompt_of(40, salt) for salt in range(5000)}) == 5000


def test_trace_helpers_keep_the_requests() -> None:
    work = [
        SimRequest(0.5, Kind.CODE, 10, 5, 20),
        SimRequest(2.0, Kind.EMBED, 30, 0, 0),
        SimRequest(1.0, Kind.REASON, 12, 7, 9, difficulty=0.9),
    ]
    exact = exact_lengths(work)
    assert [r.max_tokens for r in exact] == [5, 0, 7]
    assert [r.difficulty for r in exact] == [0.5, 0.5, 0.9]
    slow = stretched(work, 8.0)
    assert [r.at for r in slow] == [2.0, 8.0, 4.0]
    assert [(r.kind, r.prompt_tokens) for r in slow] == [(r.kind, r.prompt_tokens) for r in work]


class _Run:
    def __init__(self, kinds: list[Kind], latency: list[float]) -> None:
        self.kind = np.array([KIND_INDEX[k] for k in kinds], np.int8)
        self.latency = np.array(latency, np.float64)


def test_compare_sets_quantiles_side_by_side() -> None:
    kinds = [Kind.CODE] * 4 + [Kind.EMBED] * 2
    real = _Run(kinds, [1.0, 2.0, 3.0, 4.0, 0.1, math.nan])
    sim = _Run(kinds, [1.0, 1.0, 3.0, 6.0, 0.15, 0.2])
    gaps = compare(real, sim)
    assert list(gaps) == ["code", "embed"]  # kinds absent from the trace are left out
    code = gaps["code"]
    assert isinstance(code, KindGap)
    # Nearest rank: p50 is the 2nd of 4, p95 the 4th.
    assert (code.real.p50_s, code.sim.p50_s) == (2.0, 1.0)
    assert code.p50_error == pytest.approx(-0.5)
    assert code.p95_error == pytest.approx(0.5)
    assert not code.within(0.15) and code.within(0.5)
    embed = gaps["embed"]  # a failed request counts as a request, not as a latency
    assert embed.real.requests == 2 and embed.real.served == 1
    assert embed.p50_error == pytest.approx(0.5)
    assert code.to_dict()["p50_error"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="same trace"):
        compare(real, _Run(kinds[::-1], [1.0] * 6))


def test_real_result_lays_out_like_a_sim_result() -> None:
    work = [SimRequest(0.0, Kind.CODE, 10, 5, 5), SimRequest(0.1, Kind.EMBED, 8, 0, 0)]
    result = RealResult(
        (
            RealRecord(0, 0.0, Kind.CODE, 0.25, "coder", 10, 5),
            RealRecord(1, 0.1, Kind.EMBED, math.nan, error="Overloaded"),
        ),
        0.3,
    )
    assert result.kind.tolist() == [KIND_INDEX[Kind.CODE], KIND_INDEX[Kind.EMBED]]
    assert result.latency[0] == 0.25 and math.isnan(result.latency[1])
    assert result.failed == 1 and result.token_mismatches(work) == 0
    assert result.token_mismatches([work[0], work[0]]) == 0  # a failed request is not checked
    wrong = RealResult((RealRecord(0, 0.0, Kind.CODE, 0.2, "coder", 10, 4), result.records[1]), 0.3)
    assert wrong.token_mismatches(work) == 1


def test_tiny_ladder_sim_and_real_agree_loosely() -> None:
    specs = [ladder_spec(n, slots=4) for n in ("embedder-tiny", "coder-tiny", "reasoner-tiny")]
    fleet = measure_fleet(specs, rounds=2, steps=8)
    # The steady scenario's requests, spread over 3 s: at the scenario's own 75% load the tiny
    # models take hundreds of requests a second, where the scheduler's own cost would dominate.
    trace = exact_lengths(stretched(scenario("steady", fleet, seed=3, requests=80), 3.0))
    assert 50 <= len(trace) <= 120

    async def real_run() -> RealResult:
        async with Scheduler(specs, policy="dynamic", admission_timeout=None, seed=3) as zs:
            return await replay_real(zs, trace)

    real = anyio.run(real_run)
    sim = simulate(fleet, trace, "dynamic", admission_timeout=None, seed=3)
    assert real.failed == 0 and sim.refused == 0
    assert real.token_mismatches(trace) == 0  # every request had the trace's exact size
    assert real.elapsed_s >= trace[-1].at  # open loop: the last arrival was not early
    gaps = compare(real, sim)
    assert len(gaps) >= 3  # the trace follows the measured fleet: a rare kind may be missing
    for kind, gap in gaps.items():
        ratio = gap.sim.p50_s / gap.real.p50_s
        assert 1.0 / P50_FACTOR <= ratio <= P50_FACTOR, (kind, gap.to_dict())
