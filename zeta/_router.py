"""The router: the candidate table built from model specs, and the per-request decision.

One :class:`Router` owns the scoring kernel's :class:`~zeta._scoring.ScoreTable`, one row per actor
(replica). Actors keep their own row's load, availability and estimates current; the router fills
capability and penalties from the specs and asks the policy for a decision. Nothing here does I/O,
reads a clock or logs: the decision path runs once per request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from ._exceptions import ConfigError
from ._policies import POLICIES, Candidate, Policy, RouteRequest
from ._scoring import NO_CANDIDATE, ScoreTable
from ._types import KIND_INDEX, SERVED_KINDS, Kind, ModelSpec, Scoring, ServicePrior

__all__ = ["Router", "build_candidates", "check_models", "device_group"]


def build_candidates(models: Sequence[ModelSpec], capacity: int) -> tuple[Candidate, ...]:
    """One candidate per replica, in model order; rows are numbered from 0."""
    out: list[Candidate] = []
    for spec in models:
        for replica in range(spec.replicas):
            out.append(
                Candidate(
                    index=len(out),
                    model=spec.name,
                    replica=replica,
                    kinds=spec.kinds,
                    preferred=spec.preferred,
                    quality=spec.quality,
                    capacity=capacity,
                    device=spec.device,
                )
            )
    return tuple(out)


def device_group(device: int | None) -> int:
    """The scoring kernel's device id for a model's ``device``: 0 for the host CPU, ``g + 1``
    for GPU ``g``. Models with the same id share a device and slow each other down."""
    return 0 if device is None else device + 1


def check_models(models: Iterable[object], max_actors: int) -> tuple[ModelSpec, ...]:
    """``models`` as a tuple, if they are model specs with unique names and at most
    ``max_actors`` replicas in all.

    Raises:
        ConfigError: naming the key ``models``.
    """
    try:
        items = tuple(models)
    except TypeError:
        raise ConfigError("must be a sequence of ModelSpec objects", key="models") from None
    if not items:
        raise ConfigError("at least one model is needed", key="models")
    specs: list[ModelSpec] = []
    for spec in items:
        if not isinstance(spec, ModelSpec):
            raise ConfigError(
                f"expected ModelSpec objects, got {type(spec).__name__}", key="models"
            )
        specs.append(spec)
    names = [m.name for m in specs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"model names must be unique, repeated: {dupes}", key="models")
    actors = sum(m.replicas for m in specs)
    if actors > max_actors:
        raise ConfigError(
            f"{actors} replicas in all; at most {max_actors} actors are run", key="models"
        )
    return tuple(specs)


class Router:
    """Candidate table plus policy.

    Args:
        candidates: from :func:`build_candidates`.
        policy: decides per request.
        scoring: the kernel's parameters (see :class:`~zeta.Scoring`).
        seed: seeds the kernel's tie-breaking rotation.
    """

    def __init__(
        self,
        candidates: Sequence[Candidate],
        policy: Policy,
        *,
        scoring: Scoring = Scoring(),
        seed: int = 0,
    ) -> None:
        if not candidates:
            raise ConfigError("at least one model is needed", key="models")
        self.candidates = tuple(candidates)
        self.policy = policy
        # The shipped policies are tested to return only capable, available rows; a user's
        # policy is checked on every decision.
        self._check = type(policy) not in POLICIES.values()
        self.table = ScoreTable(
            len(self.candidates),
            len(SERVED_KINDS),
            seed=seed,
            tau=scoring.tau,
            weight=scoring.contention_weight,
            harm_weight=scoring.harm_weight,
            co_slow=scoring.co_slow,
        )
        for c in self.candidates:
            self.table.set_device(c.index, device_group(c.device))
        #: The parameters in force.
        self.scoring = scoring
        self._fill_capabilities()
        #: Candidate rows that can serve each kind at all.
        self.capable: dict[Kind, tuple[int, ...]] = {
            kind: tuple(c.index for c in self.candidates if kind in c.kinds)
            for kind in SERVED_KINDS
        }
        #: Each model's candidate rows (its replicas), by name.
        self.rows: dict[str, tuple[int, ...]] = {}
        for c in self.candidates:
            self.rows[c.model] = (*self.rows.get(c.model, ()), c.index)
        #: The model the fixed rules prefer for each kind (spills are counted against it).
        self.preferred: dict[Kind, str | None] = {}
        for kind in SERVED_KINDS:
            pool = [c for c in self.candidates if kind in c.preferred]
            self.preferred[kind] = (
                min(pool, key=lambda c: (c.quality, c.index)).model if pool else None
            )

    # -- the decision -----------------------------------------------------------------------
    def choose(self, request: RouteRequest) -> int | None:
        """Ask the policy; check its answer is a capable, available row.

        Raises:
            RuntimeError: the policy returned a row that cannot take the request (a policy bug).
        """
        if request.rows is not None:
            return self._pinned(request.rows)
        i = self.policy.choose(request, self.table, self.candidates)
        if i is None or not self._check:
            return i
        table = self.table
        if (
            isinstance(i, bool)
            or not isinstance(i, int)
            or not 0 <= i < table.n
            or request.kind not in self.candidates[i].kinds
            or not table.available(i)
        ):
            raise RuntimeError(
                f"policy {getattr(self.policy, 'name', self.policy)!r} chose candidate {i!r}, which "
                f"cannot serve {request.kind.value!r} or is unavailable"
            )
        return i

    def _pinned(self, rows: Sequence[int]) -> int | None:
        """The least loaded available row of ``rows`` (per slot), or ``None``."""
        table = self.table
        best, best_load = None, math.inf
        for i in rows:
            if table.available(i):
                queue, in_flight = table.load(i)
                load = (queue + in_flight) / max(1, table.slots(i))
                if load < best_load:
                    best, best_load = i, load
        return best

    def scope(self, request: RouteRequest) -> tuple[int, ...]:
        """Rows the policy may place ``request`` on, whatever their state and load.

        The policy's own ``scope(request, candidates)`` if it has one (``static`` uses one model
        per kind), else every capable row; only capable rows are kept either way. Read when the
        policy declines, to tell "all down" from "all full".
        """
        capable = self.capable[request.kind]
        if request.rows is not None:
            return tuple(i for i in request.rows if i in capable)
        scope = getattr(self.policy, "scope", None)
        if scope is None:
            return capable
        allowed = set(scope(request, self.candidates))
        return tuple(i for i in capable if i in allowed)

    def fallback(self, request: RouteRequest) -> int | None:
        """The kernel's choice regardless of policy (used to retry off a dead actor)."""
        if request.rows is not None:
            return self._pinned(request.rows)
        i = self.table.choose(request.kind_index, request.est_tokens)
        return None if i == NO_CANDIDATE else i

    def retry_after(self, kind: Kind, est_tokens: float, live: Sequence[int]) -> float:
        """Seconds until a capable live actor likely frees a mailbox slot (its current call ends)."""
        best = math.inf
        for i in live:
            per_request, per_token = self.table.ewma(i)
            best = min(best, per_request + est_tokens * per_token)
        if not math.isfinite(best):
            return 1.0
        return min(60.0, max(0.001, best))

    # -- parameters -------------------------------------------------------------------------
    def seed(self, priors: Mapping[str, ServicePrior], now: float) -> None:
        """Seed each prior's model rows: step slope and co-load first, then one observation of
        the typical request at one sequence (a new row's first one sets its estimates exactly).

        Raises:
            ConfigError: a name that is no configured model, or a value that is no ServicePrior.
        """
        if not isinstance(priors, Mapping):
            raise ConfigError(f"must be a mapping, got {type(priors).__name__}", key="priors")
        table = self.table
        for name, prior in priors.items():
            rows = self.rows.get(name) if isinstance(name, str) else None
            if rows is None:
                raise ConfigError(f"no configured model is named {name!r}", key="priors")
            if not isinstance(prior, ServicePrior):
                raise ConfigError(
                    f"must be a ServicePrior, got {type(prior).__name__}", key=f"priors.{name}"
                )
            for i in rows:
                if prior.step_slope is not None:
                    table.set_step_slope(i, prior.step_slope)
                if prior.co_slow is not None:
                    table.set_co_slow(i, prior.co_slow)
                table.observe(i, prior.first_token_s, prior.token_s, now, 1)

    def apply(self, changes: Mapping[str, float]) -> Scoring:
        """Validate and apply new values for some :class:`~zeta.Scoring` fields.

        All values are checked before anything changes.

        Raises:
            ConfigError: an unknown field, or a value out of range.
        """
        old, new = self.scoring, self.scoring.replace(changes)
        if (new.tau, new.contention_weight, new.harm_weight) != (
            old.tau, old.contention_weight, old.harm_weight
        ):  # fmt: skip
            self.table.set_params(
                tau=new.tau, weight=new.contention_weight, harm_weight=new.harm_weight
            )
        if new.co_slow != old.co_slow:
            for i in range(self.table.n):
                self.table.set_co_slow(i, new.co_slow)
        self.scoring = new
        if (new.spill_penalty, new.quality_penalty) != (old.spill_penalty, old.quality_penalty):
            self._fill_capabilities()
        return new

    def _fill_capabilities(self) -> None:
        scoring = self.scoring
        for c in self.candidates:
            for kind in SERVED_KINDS:
                penalty = c.quality * scoring.quality_penalty
                if kind not in c.preferred:
                    penalty += scoring.spill_penalty
                self.table.set_capability(c.index, KIND_INDEX[kind], kind in c.kinds, penalty)
