"""Sim-to-real: the same trace replayed on a live scheduler and in the simulator, compared.

:func:`replay_real` submits every :class:`~zeta.sim.SimRequest` of a trace to a running
:class:`~zeta.Scheduler` at its scheduled time, open loop (each request is its own task, so a
slow one never delays the next arrival), with a prompt of the request's token count on the
generated ladder's vocabulary and ``max_tokens = output_tokens``: a ladder model never emits
end-of-sequence, so it generates exactly that many tokens. Latency runs from the scheduled
arrival to the answer, as in the simulator. :func:`exact_lengths` gives the simulator the same
trace (``max_tokens = output_tokens``), so the router sees the same estimates in both, and
:func:`compare` sets the per-kind p50 and p95 of the two side by side::

    trace = exact_lengths(scenario("steady", fleet, seed=1, scale=0.2))
    async with Scheduler(specs, policy="dynamic", admission_timeout=None, seed=1) as zs:
        real = await replay_real(zs, trace)
    sim = simulate(fleet, trace, "dynamic", admission_timeout=None, seed=1)
    for kind, gap in compare(real, sim).items():
        print(kind, gap.real.p50_s, gap.sim.p50_s, gap.p50_error)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
import numpy as np
import numpy.typing as npt

from .._exceptions import ZetaError
from .._ladder import _WORDS
from .._types import KIND_INDEX, SERVED_KINDS, Kind
from ._stats import Latency
from ._workload import SimRequest

if TYPE_CHECKING:
    from .._scheduler import Scheduler

__all__ = [
    "KindGap",
    "Outcomes",
    "RealRecord",
    "RealResult",
    "compare",
    "exact_lengths",
    "prompt_of",
    "replay_real",
    "stretched",
]

#: One ladder token each, alone or after another (every word is a ``▁word`` piece).
_VOCAB = tuple(dict.fromkeys(_WORDS))


def prompt_of(tokens: int, salt: int) -> str:
    """A prompt that the ladder's tokenizer encodes to ``tokens`` tokens, its beginning-of-
    sequence token included (at least 2), whose first two words spell ``salt``: prompts of
    different salts share no prefix beyond that token, so llama.cpp's prefix cache, which the
    simulator does not model, cannot shorten a prefill."""
    n = len(_VOCAB)
    words = [_VOCAB[salt % n], _VOCAB[(salt // n) % n]]
    words += [_VOCAB[(salt + 7 * i) % n] for i in range(2, max(1, tokens - 1))]
    return " ".join(words[: max(1, tokens - 1)])


def exact_lengths(workload: Sequence[SimRequest]) -> list[SimRequest]:
    """``workload`` with every request asking for exactly the tokens it generates, as a ladder
    model does (it never stops early), so the simulator's router sees the live estimates."""
    return [dataclasses.replace(r, max_tokens=r.output_tokens) for r in workload]


def stretched(workload: Sequence[SimRequest], duration: float) -> list[SimRequest]:
    """``workload`` with its arrival times scaled so the last arrives at ``duration``: the same
    requests at a lower (or higher) load, e.g. a trace of tiny models slow enough for the
    scheduler's own overhead per request to stay small beside their service times."""
    end = max((r.at for r in workload), default=0.0)
    factor = duration / end if end > 0.0 else 1.0
    return [dataclasses.replace(r, at=r.at * factor) for r in workload]


@dataclass(frozen=True, slots=True)
class RealRecord:
    """How one request of a live replay ended.

    ``latency_s``: scheduled arrival to answer (NaN when it failed with ``error``, a
    :class:`~zeta.ZetaError` class name). ``prompt_tokens`` and ``output_tokens``: what the
    backend reports it processed, to check against the trace.
    """

    index: int
    at: float
    kind: Kind
    latency_s: float
    model: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RealResult:
    """The records of a live replay in trace order, and its wall time from start to last end.

    ``kind`` and ``latency`` are arrays laid out as :class:`~zeta.sim.SimResult`'s, so
    :func:`compare` reads either.
    """

    records: tuple[RealRecord, ...]
    elapsed_s: float

    @property
    def kind(self) -> npt.NDArray[np.int8]:
        return np.fromiter((KIND_INDEX[r.kind] for r in self.records), np.int8, len(self.records))

    @property
    def latency(self) -> npt.NDArray[np.float64]:
        return np.fromiter((r.latency_s for r in self.records), np.float64, len(self.records))

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.records)

    def token_mismatches(self, workload: Sequence[SimRequest]) -> int:
        """Served requests whose prompt or output length differs from the trace's."""
        return sum(
            r.error is None
            and (r.prompt_tokens, r.output_tokens) != (w.prompt_tokens, w.output_tokens)
            for r, w in zip(self.records, workload, strict=True)
        )


async def replay_real(
    scheduler: Scheduler, workload: Sequence[SimRequest], *, salt: int = 0
) -> RealResult:
    """Submit each request of ``workload`` at its ``at`` after the start, open loop, and record
    how it ended. Prompts are :func:`prompt_of` its ``prompt_tokens`` (salted with ``salt`` plus
    its index); a completion asks for ``max_tokens = output_tokens``. Typed errors are recorded,
    never raised.
    """
    records: list[RealRecord | None] = [None] * len(workload)
    start = anyio.current_time()
    last = start

    async def one(i: int, r: SimRequest, due: float) -> None:
        nonlocal last
        text = prompt_of(r.prompt_tokens, salt + i)
        try:
            if r.kind is Kind.EMBED:
                e = await scheduler.embed(text, priority=r.priority)
                model, prompt, output = e.model, e.prompt_tokens, 0
            else:
                c = await scheduler.complete(
                    text,
                    kind=r.kind,
                    max_tokens=r.output_tokens,
                    priority=r.priority,
                    difficulty=r.difficulty,
                )
                model, prompt, output = c.model, c.prompt_tokens, c.completion_tokens
        except ZetaError as exc:
            records[i] = RealRecord(i, r.at, r.kind, math.nan, error=type(exc).__name__)
        else:
            now = anyio.current_time()
            records[i] = RealRecord(i, r.at, r.kind, now - due, model, prompt, output)
            last = max(last, now)

    async with anyio.create_task_group() as tg:
        for i in sorted(range(len(workload)), key=lambda i: workload[i].at):
            due = start + workload[i].at
            await anyio.sleep_until(due)
            tg.start_soon(one, i, workload[i], due)
    out = tuple(r for r in records if r is not None)
    assert len(out) == len(workload)
    return RealResult(out, last - start)


class Outcomes(Protocol):
    """Per-request kinds (indices into :data:`~zeta._types.SERVED_KINDS`) and latencies (NaN:
    not served): a :class:`RealResult` or a :class:`~zeta.sim.SimResult`."""

    @property
    def kind(self) -> npt.NDArray[np.int8]: ...

    @property
    def latency(self) -> npt.NDArray[np.float64]: ...


@dataclass(frozen=True, slots=True)
class KindGap:
    """One kind's latency live and simulated; errors are relative to the live figure
    (``sim / real - 1``: positive when the simulator is slower)."""

    kind: str
    real: Latency
    sim: Latency

    @property
    def p50_error(self) -> float:
        return _error(self.sim.p50_s, self.real.p50_s)

    @property
    def p95_error(self) -> float:
        return _error(self.sim.p95_s, self.real.p95_s)

    def within(self, tolerance: float) -> bool:
        """Both p50 and p95 within ``tolerance`` (relative) of the live figures."""
        return abs(self.p50_error) <= tolerance and abs(self.p95_error) <= tolerance

    def to_dict(self) -> dict[str, object]:
        def clean(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {
            "real": self.real.to_dict(),
            "sim": self.sim.to_dict(),
            "p50_error": clean(self.p50_error),
            "p95_error": clean(self.p95_error),
        }


def _error(sim: float, real: float) -> float:
    return sim / real - 1.0 if real > 0.0 and math.isfinite(sim) else math.nan


def compare(real: Outcomes, sim: Outcomes) -> Mapping[str, KindGap]:
    """Per kind present in the trace, the latency quantiles of ``real`` and ``sim`` (runs of the
    same trace, in the same order) side by side.

    Raises:
        ValueError: the runs differ in length or in their requests' kinds.
    """
    kinds = real.kind
    if kinds.shape != sim.kind.shape or not np.array_equal(kinds, sim.kind):
        raise ValueError("the runs are not of the same trace")
    out: dict[str, KindGap] = {}
    for k, kind in enumerate(SERVED_KINDS):
        mask = kinds == k
        if not mask.any():
            continue
        out[kind.value] = KindGap(
            kind.value, Latency.of_served(real.latency[mask]), Latency.of_served(sim.latency[mask])
        )
    return out
