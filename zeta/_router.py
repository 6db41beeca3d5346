"""The router: the candidate table built from model specs, and the per-request decision.

One :class:`Router` owns the scoring kernel's :class:`~zeta._scoring.ScoreTable`, one row per actor
(replica). Actors keep their own row's load, availability and estimates current; the router fills
capability and penalties from the specs and asks the policy for a decision. Nothing here does I/O,
reads a clock or logs: the decision path runs once per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ._exceptions import ConfigError
from ._policies import POLICIES, Candidate, Policy, RouteRequest
from ._scoring import NO_CANDIDATE, ScoreTable
from ._types import KIND_INDEX, SERVED_KINDS, Kind, ModelSpec

__all__ = ["TUNABLE_PARAMS", "Router", "build_candidates"]

#: Router parameters a calibrator may set (see :meth:`Router.apply_params`).
TUNABLE_PARAMS = ("tau", "contention_weight", "spill_penalty", "quality_penalty")


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
                )
            )
    return tuple(out)


class Router:
    """Candidate table plus policy.

    Args:
        candidates: from :func:`build_candidates`.
        policy: decides per request.
        seed: seeds the kernel's tie-breaking rotation.
        tau: peak-EWMA time constant (seconds).
        contention_weight: weight of utilisation in the kernel's cost.
        spill_penalty: seconds added to the cost of serving a kind the model does not prefer.
        quality_penalty: seconds added per quality rank (0 is best).
    """

    def __init__(
        self,
        candidates: Sequence[Candidate],
        policy: Policy,
        *,
        seed: int = 0,
        tau: float = 5.0,
        contention_weight: float = 1.0,
        spill_penalty: float = 1.0,
        quality_penalty: float = 0.25,
    ) -> None:
        if not candidates:
            raise ConfigError("at least one model is needed", key="models")
        self.candidates = tuple(candidates)
        self.policy = policy
        # The shipped policies are tested to return only capable, available rows; a user's
        # policy is checked on every decision.
        self._check = type(policy) not in POLICIES.values()
        self.table = ScoreTable(
            len(self.candidates), len(SERVED_KINDS), seed=seed, tau=tau, weight=contention_weight
        )
        self.spill_penalty = 0.0
        self.quality_penalty = 0.0
        self.apply_params({"spill_penalty": spill_penalty, "quality_penalty": quality_penalty})
        #: Candidate rows that can serve each kind at all.
        self.capable: dict[Kind, tuple[int, ...]] = {
            kind: tuple(c.index for c in self.candidates if kind in c.kinds)
            for kind in SERVED_KINDS
        }
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

    def scope(self, request: RouteRequest) -> tuple[int, ...]:
        """Rows the policy may place ``request`` on, whatever their state and load.

        The policy's own ``scope(request, candidates)`` if it has one (``static`` uses one model
        per kind), else every capable row; only capable rows are kept either way. Read when the
        policy declines, to tell "all down" from "all full".
        """
        capable = self.capable[request.kind]
        scope = getattr(self.policy, "scope", None)
        if scope is None:
            return capable
        allowed = set(scope(request, self.candidates))
        return tuple(i for i in capable if i in allowed)

    def fallback(self, request: RouteRequest) -> int | None:
        """The kernel's choice regardless of policy (used to retry off a dead actor)."""
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
    def params(self) -> dict[str, float]:
        """Current values of :data:`TUNABLE_PARAMS`."""
        return {
            "tau": self.table.tau,
            "contention_weight": self.table.weight,
            "spill_penalty": self.spill_penalty,
            "quality_penalty": self.quality_penalty,
        }

    def apply_params(self, params: Mapping[str, float]) -> dict[str, float]:
        """Validate and apply some of :data:`TUNABLE_PARAMS`; return what was applied.

        All values are checked before anything changes.

        Raises:
            ConfigError: an unknown key, or a value that is not a finite number in range.
        """
        clean: dict[str, float] = {}
        for key, value in params.items():
            if key not in TUNABLE_PARAMS:
                raise ConfigError(f"unknown parameter; tunable: {list(TUNABLE_PARAMS)}", key=key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(f"must be a finite number, got {value!r}", key=key)
            if value < 0 or (key == "tau" and value <= 0):
                raise ConfigError(
                    f"must be {'> 0' if key == 'tau' else '>= 0'}, got {value!r}", key=key
                )
            clean[key] = float(value)
        if "tau" in clean or "contention_weight" in clean:
            self.table.set_params(tau=clean.get("tau"), weight=clean.get("contention_weight"))
        if "spill_penalty" in clean or "quality_penalty" in clean:
            self.spill_penalty = clean.get("spill_penalty", self.spill_penalty)
            self.quality_penalty = clean.get("quality_penalty", self.quality_penalty)
            self._fill_capabilities()
        return clean

    def _fill_capabilities(self) -> None:
        for c in self.candidates:
            for kind in SERVED_KINDS:
                penalty = c.quality * self.quality_penalty
                if kind not in c.preferred:
                    penalty += self.spill_penalty
                self.table.set_capability(c.index, KIND_INDEX[kind], kind in c.kinds, penalty)
