"""Seeded scenarios, with loads defined relative to the fleet's computed capacity.

A load is a share of a model's capacity: the requests per second it serves at full occupancy
(every slot busy), under the co-load it can expect from the other models on its device. The
static rules route each kind to one model (its *rule* model: the best-quality model preferring
it, as :class:`~zeta._policies.StaticPolicy` does), so a scenario says, per kind, what share
of its rule model's capacity that kind's requests take; :class:`Capacity` turns that into
arrival rates for the fleet at hand. Change a profile and the rates follow, so "calm" stays at
half of what the models can do.

The expected co-load factor of a model is the mean of its ``coload`` slowdowns over how many
other models on its device are busy, each busy with probability equal to its load (an
approximation: a model at half load is busy somewhat more than half the time, since it runs
below full occupancy).

Scenarios (each a few thousand requests at ``scale=1``):

========== =====================================================================================
calm       every model at 50% load, Poisson arrivals
steady     every model at 75%
bursty     45% background; every 20 s a 4 s storm of high-priority code at +150% of the coder
surge      one model's kinds at 50%, and for 30 s in every 60 s at 120% of its capacity; the
           others' kinds at 20% (embeddings 30%). The surged model is the one whose excess the
           other models absorb best, counting what absorbing costs on a shared device
           (:meth:`Capacity.surge_model`). On both shipped fleets that is the reasoner: the
           coder serves reasoning at a fraction of the reasoner's cost, while the reasoner
           would serve code at several times the coder's and, on a shared device, slow the
           coder too (on the 2-core ladder a coder surge leaves no room at all)
overwhelm  the same at 200% on the model whose excess the others absorb least (on both
           shipped fleets the coder): no policy can absorb it (contended headroom < 1)
fanout     agents: a plan (reason), then 8 code edits and 4 embeddings at once, then a summary
           (simple); sessions arrive so the busiest model averages 60%
heavy_tail every model at 60%, with lognormal prompt and output lengths (sigma 1.2, same means)
drift      the coder's and the reasoner's loads swing between 40% and 90% in opposite phase
           over 150 s; embedder at 50%
========== =====================================================================================
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .._types import SERVED_KINDS, Kind, Priority
from ._profile import Fleet, SimModel
from ._workload import DEFAULT_SHAPES, HEAVY_SHAPES, Shape, SimRequest

__all__ = ["SCENARIOS", "Capacity", "Phase", "Scenario", "scenario", "surge_loads"]

#: Share of the coder's load that is ``simple`` (the rest is ``code``).
SIMPLE_SHARE = 0.4
#: Loads of the kinds not surged: embeddings, and every other kind.
SURGE_BACKGROUND: Mapping[Kind, float] = {Kind.EMBED: 0.3}
SURGE_OTHERS = 0.2
#: The absorbable surge's level: its kinds' share of the surged model's capacity (1.15-1.3).
SURGE = 1.2
#: The overwhelming surge's level.
OVERWHELM = 2.0


class Capacity:
    """What a fleet serves of each kind, for arrival rates defined by load.

    Args:
        fleet: the models.
        shapes: the request shapes whose mean sizes define a request's cost.
    """

    def __init__(self, fleet: Fleet, shapes: Mapping[Kind, Shape] = DEFAULT_SHAPES) -> None:
        self.fleet = fleet
        self.shapes = shapes
        models = fleet.models
        #: Per kind, the models static sends it to (usually one).
        self.pool: dict[Kind, tuple[SimModel, ...]] = {}
        for kind in SERVED_KINDS:
            pool = [m for m in models if kind in m.spec.preferred] or [
                m for m in models if kind in m.spec.kinds
            ]
            best = min((m.spec.quality for m in pool), default=0)
            self.pool[kind] = tuple(m for m in pool if m.spec.quality == best)
        #: Kinds some model can serve; a scenario's requests of other kinds are left out.
        self.served = frozenset(k for k, pool in self.pool.items() if pool)
        #: Full-occupancy seconds of one mean request of each kind on each capable model.
        self.cost: dict[tuple[str, Kind], float] = {}
        for m in models:
            for kind in m.spec.kinds:
                if kind in shapes:
                    prompt, output = shapes[kind].means()
                    self.cost[m.name, kind] = m.profile.full_batch_s(prompt, output)

    # -- co-load ----------------------------------------------------------------------------
    def factor(self, model: SimModel, busy: Mapping[str, float]) -> float:
        """``model``'s expected co-load slowdown when each context of the other models on its
        device is busy with probability ``busy[name]`` (clamped to ``[0, 1]``)."""
        dist = [1.0]  # distribution of the number of other busy contexts
        for m in self.fleet.models:
            if m.spec.device != model.spec.device:
                continue
            copies = m.spec.replicas - (1 if m is model else 0)
            b = min(1.0, max(0.0, busy.get(m.name, 0.0)))
            for _ in range(copies):
                nxt = [0.0] * (len(dist) + 1)
                for j, p in enumerate(dist):
                    nxt[j] += p * (1.0 - b)
                    nxt[j + 1] += p * b
                dist = nxt
        coload = model.profile.coload
        return sum(p * coload[min(j, len(coload) - 1)] for j, p in enumerate(dist))

    # -- loads and rates --------------------------------------------------------------------
    def model_loads(self, loads: Mapping[Kind, float]) -> dict[str, float]:
        """Each model's load when each kind takes ``loads[kind]`` of its rule models."""
        out = dict.fromkeys((m.name for m in self.fleet.models), 0.0)
        for kind, load in loads.items():
            for m in self.pool[kind]:
                out[m.name] += load
        return out

    def kind_capacity(self, kind: Kind, busy: Mapping[str, float]) -> float:
        """Requests per second of ``kind`` its rule models serve at full occupancy."""
        return sum(
            m.spec.replicas / (self.cost[m.name, kind] * self.factor(m, busy))
            for m in self.pool[kind]
        )

    def rates(
        self, loads: Mapping[Kind, float], over: Mapping[Kind, float] | None = None
    ) -> dict[Kind, float]:
        """Arrival rates (per second) that put ``loads`` on the kinds' rule models, on top of
        ``over`` (loads already there, which add to the co-load)."""
        total = dict(loads)
        for k, v in (over or {}).items():
            total[k] = total.get(k, 0.0) + v
        busy = self.model_loads(total)
        return {
            k: v * self.kind_capacity(k, busy)
            for k, v in loads.items()
            if v > 0.0 and k in self.served
        }

    def loads_of(self, rates: Mapping[Kind, float]) -> dict[Kind, float]:
        """The per-kind loads of arrival ``rates`` (the inverse of :meth:`rates`, solved as a
        fixed point since the co-load depends on the loads); kinds no model serves are left
        out."""
        rates = {k: r for k, r in rates.items() if k in self.served}
        loads = dict.fromkeys(rates, 0.0)
        for _ in range(100):
            busy = self.model_loads(loads)
            new = {k: r / self.kind_capacity(k, busy) for k, r in rates.items()}
            if all(abs(new[k] - loads[k]) < 1e-12 for k in rates):
                break
            loads = new
        return new

    def offered(
        self,
        requests: Sequence[SimRequest],
        start: float,
        end: float,
        busy: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Each model's load from the requests arriving in ``[start, end)``, with their own
        sizes, under the static rules (a kind spread over its rule models by capacity), at the
        co-load of ``busy`` (per model, the probability it is busy; by default the loads found,
        solved as a fixed point)."""
        work = dict.fromkeys((m.name for m in self.fleet.models), 0.0)
        span = end - start
        if span <= 0.0:
            return work
        for r in requests:
            if start <= r.at < end and r.kind in self.served:
                pool = self.pool[r.kind]
                shares = [m.spec.replicas / self.cost[m.name, r.kind] for m in pool]
                total = sum(shares)
                for m, share in zip(pool, shares, strict=True):
                    s = m.profile.full_batch_s(r.prompt_tokens, r.output_tokens)
                    work[m.name] += s * share / total / m.spec.replicas
        loads = {name: w / span for name, w in work.items()}
        by_name = {m.name: m for m in self.fleet.models}
        if busy is not None:
            return {n: w * self.factor(by_name[n], busy) for n, w in loads.items()}
        found = dict(loads)
        for _ in range(100):
            new = {n: w * self.factor(by_name[n], found) for n, w in loads.items()}
            if all(abs(new[n] - found[n]) < 1e-12 for n in new):
                break
            found = new
        return new

    def absorbers(self, kinds: Sequence[Kind]) -> tuple[SimModel, ...]:
        """Models that can serve every one of ``kinds`` without being a rule model of any."""
        return tuple(
            m
            for m in self.fleet.models
            if all(k in m.spec.kinds and m not in self.pool[k] for k in kinds)
        )

    def surge_busy(self, loads: Mapping[Kind, float]) -> dict[str, float]:
        """Busy probabilities while an overload is absorbed: the overloaded models and those
        that can absorb their kinds busy, the rest at their load."""
        busy = self.model_loads(loads)
        over = [
            k for k, v in loads.items() if v > 0.0 and any(busy[m.name] > 1.0 for m in self.pool[k])
        ]
        for m in (*(m for k in over for m in self.pool[k]), *self.absorbers(over)):
            busy[m.name] = 1.0
        return busy

    def headroom(self, loads: Mapping[Kind, float], *, contended: bool = False) -> float:
        """How many times over the other models' spare capacity covers the excess of the
        overloaded models at ``loads`` (``inf`` when no model is above 100%).

        An overloaded model's excess is the rate of its kinds' requests above its capacity;
        the models that can serve those kinds without being their rule models absorb it at
        their own speed for those kinds, in the time their own load leaves free. Nominally
        every capacity is taken at the co-load the loads imply (the static rules' view). With
        ``contended`` it is taken at the co-load of absorbing (:meth:`surge_busy`): the
        absorbers are busy all the time, which slows the overloaded model on a shared device
        too and so adds to its excess: the harder, physical test.
        """
        static = self.model_loads(loads)
        busy = self.surge_busy(loads) if contended else static
        excess: dict[Kind, float] = {}
        for kind, rate in self.rates(loads).items():
            over = max(static[m.name] for m in self.pool[kind])
            if over > 1.0:
                served = loads[kind] / over * self.kind_capacity(kind, busy)
                excess[kind] = max(0.0, rate - served)
        if not excess:
            return math.inf
        covered = 0.0
        for m in self.absorbers(list(excess)):
            f = self.factor(m, busy)
            spare = 1.0 - static[m.name] * f / self.factor(m, static)
            need = sum(rate * self.cost[m.name, k] * f for k, rate in excess.items())
            if spare > 0.0 and need > 0.0:
                covered += spare * m.spec.replicas / need
        return covered

    def groups(self) -> dict[str, tuple[Kind, ...]]:
        """Per rule model, in fleet order, the kinds the static rules send to it."""
        out: dict[str, tuple[Kind, ...]] = {}
        for m in self.fleet.models:
            kinds = tuple(k for k in SERVED_KINDS if m in self.pool[k])
            if kinds:
                out[m.name] = kinds
        return out

    def surge_loads(self, model: str, level: float) -> dict[Kind, float]:
        """Per-kind loads while ``model``'s kinds arrive at ``level`` of its capacity: the
        other kinds at :data:`SURGE_BACKGROUND` (embeddings) or :data:`SURGE_OTHERS`."""
        kinds = self.groups()[model]
        out = {
            k: SURGE_BACKGROUND.get(k, SURGE_OTHERS)
            for k in SERVED_KINDS
            if k in self.served and k not in kinds
        }
        for kind, share in _shares(kinds).items():
            out[kind] = share * level
        return out

    def surge_model(self, level: float = SURGE, *, absorbable: bool = True) -> str:
        """The rule model whose kinds a surge at ``level`` overloads: of those whose excess
        some other model can serve, the one with the most contended :meth:`headroom` (with
        ``absorbable=False`` the least: the surge no routing can absorb); ties in fleet
        order; with none, the first rule model."""
        groups = self.groups()
        best, best_room = next(iter(groups)), math.nan
        sign = 1.0 if absorbable else -1.0
        for name, kinds in groups.items():
            if not self.absorbers(kinds):
                continue
            room = sign * self.headroom(self.surge_loads(name, level), contended=True)
            if not room <= best_room:  # the first, or more room (less when not absorbable)
                best, best_room = name, room
        return best


# -- scenarios --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Phase:
    """Poisson arrivals in ``[start, end)`` at ``loads`` (per kind, a share of its rule
    models' capacity), at ``priority`` per kind (default normal). ``over`` are the loads of
    phases running at the same time (they add to the co-load these arrivals meet)."""

    start: float
    end: float
    loads: Mapping[Kind, float]
    priority: Mapping[Kind, Priority] = field(default_factory=dict)
    over: Mapping[Kind, float] = field(default_factory=dict)


def _coder(load: float) -> dict[Kind, float]:
    return {Kind.SIMPLE: SIMPLE_SHARE * load, Kind.CODE: (1.0 - SIMPLE_SHARE) * load}


def _shares(kinds: Sequence[Kind]) -> dict[Kind, float]:
    """How one model's load splits over ``kinds``: simple and code as on the coder, else
    evenly."""
    if set(kinds) == {Kind.SIMPLE, Kind.CODE}:
        return _coder(1.0)
    return dict.fromkeys(kinds, 1.0 / len(kinds))


def _even(
    load: float, embed: float | None = None, reason: float | None = None
) -> dict[Kind, float]:
    return {
        **_coder(load),
        Kind.EMBED: load if embed is None else embed,
        Kind.REASON: load if reason is None else reason,
    }


def _poisson(
    rng: random.Random, cap: Capacity, phase: Phase, shapes: Mapping[Kind, Shape]
) -> list[SimRequest]:
    out: list[SimRequest] = []
    for kind, rate in cap.rates(phase.loads, phase.over).items():
        if rate <= 0.0:
            continue
        prio = phase.priority.get(kind, Priority.NORMAL)
        t = phase.start + rng.expovariate(rate)
        while t < phase.end:
            out.append(_request(rng, t, kind, shapes, prio))
            t += rng.expovariate(rate)
    return out


def _request(
    rng: random.Random,
    at: float,
    kind: Kind,
    shapes: Mapping[Kind, Shape],
    priority: Priority = Priority.NORMAL,
) -> SimRequest:
    prompt, output, max_tokens = shapes[kind].draw(rng)
    difficulty = rng.random() if kind is Kind.REASON else 0.5
    return SimRequest(at, kind, prompt, output, max_tokens, priority, difficulty)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named, seeded workload generator.

    ``phases(cap, scale)`` lays out its Poisson phases (``scale`` stretches the timeline), and
    ``extra`` (for agent sessions) adds requests that are not Poisson. ``shapes`` are its
    request sizes.
    """

    name: str
    description: str
    phases: Callable[[Capacity, float], list[Phase]]
    shapes: Mapping[Kind, Shape] = field(default_factory=lambda: DEFAULT_SHAPES)
    extra: (
        Callable[[random.Random, Capacity, float], tuple[list[SimRequest], list[Phase]]] | None
    ) = None

    def build(self, fleet: Fleet, seed: int, scale: float = 1.0) -> list[SimRequest]:
        """The scenario's requests for ``fleet``, sorted by arrival."""
        cap = Capacity(fleet, self.shapes)
        rng = random.Random(f"{self.name}:{seed}")
        out: list[SimRequest] = []
        for phase in self.phases(cap, scale):
            out.extend(_poisson(rng, cap, phase, self.shapes))
        if self.extra is not None:
            out.extend(self.extra(rng, cap, scale)[0])
        out.sort(key=lambda r: r.at)
        return out

    def targets(
        self, fleet: Fleet, scale: float = 1.0
    ) -> list[tuple[float, float, dict[str, float]]]:
        """``(start, end, load per model)`` the scenario means to offer, per stretch of time
        in which the same phases are active."""
        cap = Capacity(fleet, self.shapes)
        phases = self.phases(cap, scale)
        if self.extra is not None:
            phases = phases + self.extra(random.Random(0), cap, scale)[1]
        cuts = sorted({t for p in phases for t in (p.start, p.end)})
        out = []
        for a, b in itertools.pairwise(cuts):
            loads: dict[Kind, float] = {}
            for p in phases:
                if p.start <= a and b <= p.end:
                    for k, v in p.loads.items():
                        loads[k] = loads.get(k, 0.0) + v
            out.append((a, b, cap.model_loads(loads)))
        return out


def _steady(load: float, duration: float) -> Callable[[Capacity, float], list[Phase]]:
    def phases(cap: Capacity, scale: float) -> list[Phase]:
        return [Phase(0.0, duration * scale, _even(load))]

    return phases


def _bursty(cap: Capacity, scale: float) -> list[Phase]:
    background = _even(0.45)
    out = [Phase(0.0, 240.0 * scale, background)]
    t = 5.0
    while t < 240.0:
        out.append(
            Phase(
                t * scale,
                (t + 4.0) * scale,
                {Kind.CODE: 1.5},
                {Kind.CODE: Priority.HIGH},
                background,
            )
        )
        t += 20.0
    return out


def _surges(level: float, *, absorbable: bool) -> Callable[[Capacity, float], list[Phase]]:
    """The surged model's kinds (:meth:`Capacity.surge_model`) at 50% for 30 s, then at
    ``level`` for 30 s, three times, then 30 s at 50%; the other kinds at their background
    throughout."""

    def phases(cap: Capacity, scale: float) -> list[Phase]:
        model = cap.surge_model(level, absorbable=absorbable)
        surged = cap.groups()[model]
        surge = cap.surge_loads(model, level)
        bg = {k: surge.pop(k) for k in list(surge) if k not in surged}
        calm = {k: v for k, v in cap.surge_loads(model, 0.5).items() if k in surged}
        out = [Phase(0.0, 210.0 * scale, bg, over=calm)]
        for c in range(3):
            t = 60.0 * c
            out.append(Phase(t * scale, (t + 30.0) * scale, calm, over=bg))
            out.append(Phase((t + 30.0) * scale, (t + 60.0) * scale, surge, over=bg))
        out.append(Phase(180.0 * scale, 210.0 * scale, calm, over=bg))
        return out

    return phases


def surge_loads(
    fleet: Fleet, level: float = SURGE, *, absorbable: bool = True
) -> dict[Kind, float]:
    """Per-kind loads during the ``surge`` scenario's surges on ``fleet`` (``level=OVERWHELM,
    absorbable=False``: the ``overwhelm`` scenario's)."""
    cap = Capacity(fleet)
    return cap.surge_loads(cap.surge_model(level, absorbable=absorbable), level)


def _drift(cap: Capacity, scale: float) -> list[Phase]:
    out = []
    step = 5.0
    for n in range(int(300.0 / step)):
        t = n * step
        swing = 0.25 * math.sin(2.0 * math.pi * (t + step / 2.0) / 150.0)
        loads = {**_coder(0.65 + swing), Kind.EMBED: 0.5, Kind.REASON: 0.65 - swing}
        out.append(Phase(t * scale, (t + step) * scale, loads))
    return out


#: Agent sessions: code edits and embeddings per plan.
FANOUT = (8, 4)


def _fanout(
    rng: random.Random, cap: Capacity, scale: float
) -> tuple[list[SimRequest], list[Phase]]:
    """Sessions arriving as a Poisson process; each is a plan (reason), then after the plan's
    "thinking" (1-3 s) 8 code edits and 4 embeddings at once, then 0.5-2 s later a summary
    (simple). The session rate puts the busiest model at 60% on average."""
    duration = 240.0 * scale
    code, embed = FANOUT
    per_session = {
        k: v
        for k, v in (
            (Kind.REASON, 1.0),
            (Kind.CODE, float(code)),
            (Kind.EMBED, float(embed)),
            (Kind.SIMPLE, 1.0),
        )
        if k in cap.served
    }
    unit = cap.loads_of(per_session)  # loads of one session per second
    top = max(cap.model_loads(unit).values())
    rate = 0.6 / top
    loads = cap.loads_of({k: v * rate for k, v in per_session.items()})
    out: list[SimRequest] = []
    shapes = DEFAULT_SHAPES
    t = rng.expovariate(rate)
    while t < duration:
        burst = t + rng.uniform(1.0, 3.0)
        session = [(t, Kind.REASON, Priority.NORMAL)]
        session += [
            (burst + rng.uniform(0.0, 0.02), Kind.CODE, Priority.NORMAL) for _ in range(code)
        ]
        session += [
            (burst + rng.uniform(0.0, 0.02), Kind.EMBED, Priority.LOW) for _ in range(embed)
        ]
        session.append((burst + rng.uniform(0.5, 2.0), Kind.SIMPLE, Priority.NORMAL))
        out.extend(_request(rng, at, k, shapes, p) for at, k, p in session if k in cap.served)
        t += rng.expovariate(rate)
    return out, [Phase(0.0, duration, loads)]


SCENARIOS: Mapping[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("calm", "every model at 50% load", _steady(0.5, 240.0)),
        Scenario("steady", "every model at 75% load", _steady(0.75, 180.0)),
        Scenario("bursty", "45% background, 4 s code storms at +150% every 20 s", _bursty),
        Scenario(
            "surge",
            "one model's kinds at 120% for 30 s in every 60 s (absorbable)",
            _surges(SURGE, absorbable=True),
        ),
        Scenario(
            "overwhelm",
            "the model least able to shed load at 200% for 30 s in every 60 s",
            _surges(OVERWHELM, absorbable=False),
        ),
        Scenario(
            "fanout",
            "agent sessions: plan, 8 code + 4 embed at once, summary",
            lambda cap, scale: [],
            extra=_fanout,
        ),
        Scenario(
            "heavy_tail", "every model at 60%, lognormal lengths", _steady(0.6, 240.0), HEAVY_SHAPES
        ),
        Scenario("drift", "coder and reasoner swing 40-90% in opposite phase", _drift),
    )
}


def scenario(
    name: str, fleet: Fleet, seed: int = 0, *, requests: int | None = None, scale: float = 1.0
) -> list[SimRequest]:
    """The requests of scenario ``name`` for ``fleet``, seeded.

    ``requests`` stretches or compresses the timeline (loads unchanged) so that about that many
    requests arrive; otherwise ``scale`` does.

    Raises:
        KeyError: an unknown scenario.
    """
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}")
    s = SCENARIOS[name]
    if requests is not None:
        if requests < 1:
            raise ValueError(f"requests must be >= 1, got {requests!r}")
        scale = requests / max(1, len(s.build(fleet, seed, 1.0)))
    return s.build(fleet, seed, scale)
