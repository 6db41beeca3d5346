"""Seeded synthetic workloads: steady, bursty and agent fan-out arrival schedules.

A workload is a list of :class:`Arrival` sorted by time. The demo, the benchmarks and users'
own tests replay the same seeded schedule against different policies for an A/B comparison.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from .._types import Kind, Priority

__all__ = ["Arrival", "agent_fanout", "bursty", "make_prompt", "steady"]

_WORDS = (
    "the model request queue token load router agent plan step value list file test data cache "
    "user time result error state graph node edge batch stream"
).split()
_CODE = (
    "def ",
    "return ",
    "import ",
    "class ",
    "for i in range(n):",
    "if x is None:",
    "```",
    "{}",
    "();",
)
_REASON = ("why", "explain", "step by step", "prove", "compare", "therefore", "because")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a workload, ``at`` seconds after the start."""

    at: float
    kind: Kind
    prompt: str
    max_tokens: int
    priority: Priority = Priority.NORMAL


def make_prompt(rng: random.Random, kind: Kind, words: int) -> str:
    """A synthetic prompt of about ``words`` words with the markers of its kind."""
    parts = [rng.choice(_WORDS) for _ in range(max(1, words))]
    if kind is Kind.CODE:
        for _ in range(max(1, words // 6)):
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(_CODE))
    elif kind is Kind.REASON:
        parts.insert(0, rng.choice(_REASON))
        parts.append(rng.choice(_REASON) + "?")
    return " ".join(parts)


#: Default request shapes per kind: (prompt words low, high, max_tokens low, high).
SHAPES: Mapping[Kind, tuple[int, int, int, int]] = {
    Kind.SIMPLE: (4, 16, 8, 24),
    Kind.CODE: (12, 48, 16, 48),
    Kind.EMBED: (4, 24, 1, 1),
    Kind.REASON: (24, 64, 48, 96),
}


def _arrival(rng: random.Random, at: float, kind: Kind, priority: Priority) -> Arrival:
    lo, hi, tlo, thi = SHAPES[kind]
    return Arrival(
        at, kind, make_prompt(rng, kind, rng.randint(lo, hi)), rng.randint(tlo, thi), priority
    )


def _pick(rng: random.Random, mix: Mapping[Kind, float]) -> Kind:
    kinds = list(mix)
    return rng.choices(kinds, weights=[mix[k] for k in kinds])[0]


DEFAULT_MIX: Mapping[Kind, float] = {
    Kind.SIMPLE: 0.3,
    Kind.CODE: 0.3,
    Kind.EMBED: 0.2,
    Kind.REASON: 0.2,
}


def steady(
    duration: float, rate: float, *, mix: Mapping[Kind, float] = DEFAULT_MIX, seed: int = 0
) -> list[Arrival]:
    """Poisson arrivals at ``rate`` per second for ``duration`` seconds."""
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < duration:
        out.append(_arrival(rng, t, _pick(rng, mix), Priority.NORMAL))
        t += rng.expovariate(rate)
    return out


def bursty(
    duration: float,
    rate: float,
    *,
    burst_kind: Kind = Kind.CODE,
    burst_rate: float | None = None,
    burst_every: float = 10.0,
    burst_len: float = 4.0,
    mix: Mapping[Kind, float] = DEFAULT_MIX,
    seed: int = 0,
) -> list[Arrival]:
    """A steady background mix plus periodic surges of ``burst_kind`` (a code-edit storm).

    The surge adds Poisson arrivals at ``burst_rate`` (default ``4 * rate``) during the first
    ``burst_len`` seconds of every ``burst_every`` seconds, at high priority, as an agent's
    edit loop would.
    """
    rng = random.Random(seed)
    out = steady(duration, rate, mix=mix, seed=rng.randrange(2**32))
    brate = burst_rate if burst_rate is not None else 4.0 * rate
    start = burst_every / 4.0
    while start < duration:
        t = start + rng.expovariate(brate)
        while t < min(start + burst_len, duration):
            out.append(_arrival(rng, t, burst_kind, Priority.HIGH))
            t += rng.expovariate(brate)
        start += burst_every
    out.sort(key=lambda a: a.at)
    return out


def agent_fanout(
    duration: float,
    *,
    agents: int = 4,
    fanout: int = 6,
    think_s: float = 2.0,
    seed: int = 0,
) -> list[Arrival]:
    """Agents that plan (one reasoning request), then fan out code edits and embeddings.

    Every ``think_s`` seconds (jittered) each agent issues a reason request, followed shortly
    by ``fanout`` code requests and half as many embeddings, all at once.
    """
    rng = random.Random(seed)
    out: list[Arrival] = []
    for _ in range(agents):
        t = rng.uniform(0.0, think_s)
        while t < duration:
            out.append(_arrival(rng, t, Kind.REASON, Priority.NORMAL))
            burst = t + rng.uniform(0.05, 0.3)
            for _ in range(fanout):
                out.append(_arrival(rng, burst, Kind.CODE, Priority.NORMAL))
            for _ in range(max(1, fanout // 2)):
                out.append(_arrival(rng, burst, Kind.EMBED, Priority.LOW))
            t += think_s * rng.uniform(0.7, 1.3)
    out = [a for a in out if a.at < duration]
    out.sort(key=lambda a: a.at)
    return out
