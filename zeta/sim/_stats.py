"""What one simulated run amounted to: latency per kind, refusals, spills and quality."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._types import SERVED_KINDS

__all__ = ["Interval", "Latency", "SimResult", "SimSummary"]


@dataclass(frozen=True, slots=True)
class Latency:
    """Latency of the served requests of one group, seconds (NaN when none was served).

    Quantiles are nearest-rank: an observed latency, never an interpolation.
    """

    requests: int
    served: int
    p50_s: float
    p95_s: float
    p99_s: float
    mean_s: float
    max_s: float

    @classmethod
    def of(cls, requests: int, latencies: npt.NDArray[np.float64]) -> Latency:
        if latencies.size == 0:
            nan = math.nan
            return cls(requests, 0, nan, nan, nan, nan, nan)
        p50, p95, p99 = np.quantile(latencies, (0.5, 0.95, 0.99), method="inverted_cdf")
        return cls(
            requests,
            int(latencies.size),
            float(p50),
            float(p95),
            float(p99),
            float(latencies.mean()),
            float(latencies.max()),
        )

    @classmethod
    def of_served(cls, latencies: npt.NDArray[np.float64]) -> Latency:
        """Quantiles of the served requests among all of ``latencies`` (NaN: not served)."""
        return cls.of(latencies.size, latencies[np.isfinite(latencies)])

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in (
                ("requests", self.requests),
                ("served", self.served),
                ("p50_s", self.p50_s),
                ("p95_s", self.p95_s),
                ("p99_s", self.p99_s),
                ("mean_s", self.mean_s),
                ("max_s", self.max_s),
            )
        }


@dataclass(frozen=True, slots=True)
class SimSummary:
    """Latency overall and per kind, and how the requests were served.

    ``spilled_share``: share of served requests on a model that does not prefer their kind.
    ``quality``: the quality cost, per served request: a spilled request counts 1 plus the
    quality ranks it went down from the model the fixed rule prefers for its kind (so a spill to
    an equal or better model counts 1, a spill one rank down 2); 0 is every request on its
    preferred model. ``refused``: requests refused (:class:`~zeta.Overloaded`), never dropped.
    """

    requests: int
    served: int
    refused: int
    latency: Latency
    by_kind: Mapping[str, Latency]
    spilled_share: float
    quality: float
    by_model: Mapping[str, int]
    busy_share: Mapping[str, float]
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "served": self.served,
            "refused": self.refused,
            "latency": self.latency.to_dict(),
            "by_kind": {k: v.to_dict() for k, v in self.by_kind.items()},
            "spilled_share": self.spilled_share,
            "quality": self.quality,
            "by_model": dict(self.by_model),
            "busy_share": dict(self.busy_share),
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True, slots=True)
class SimResult:
    """Per-request outcomes of one run, as arrays in workload order.

        ``latency``: arrival to finish, seconds (NaN if refused); ``first_token``: arrival to the
        end of its prefill (its first token; for an embedding its result); ``kind``: index into
        :data:`~zeta._types.SERVED_KINDS`; ``model``: index into ``models`` (-1 if refused);
        ``quality``: each request's quality cost (see :class:`SimSummary`); ``spilled``: served by
        a model not preferring its kind. ``events``: events processed; ``wall_s`` and ``cpu_s``: the
    wall and process CPU time the replay took (the machine's other load shows in the first only).
    """

    policy: str
    models: tuple[str, ...]
    at: npt.NDArray[np.float64]
    latency: npt.NDArray[np.float64]
    first_token: npt.NDArray[np.float64]
    kind: npt.NDArray[np.int8]
    model: npt.NDArray[np.int16]
    quality: npt.NDArray[np.float64]
    spilled: npt.NDArray[np.bool_]
    busy_share: Mapping[str, float]
    duration_s: float
    events: int
    wall_s: float
    cpu_s: float = math.nan

    @property
    def requests(self) -> int:
        return int(self.latency.size)

    @property
    def refused(self) -> int:
        return int((self.model < 0).sum())

    def summary(self) -> SimSummary:
        ok = self.model >= 0
        lat = self.latency[ok]
        by_kind = {}
        for k, kind in enumerate(SERVED_KINDS):
            mask = self.kind == k
            by_kind[kind.value] = Latency.of(int(mask.sum()), self.latency[mask & ok])
        served = int(ok.sum())
        return SimSummary(
            requests=self.requests,
            served=served,
            refused=self.requests - served,
            latency=Latency.of(self.requests, lat),
            by_kind=by_kind,
            spilled_share=float(self.spilled[ok].mean()) if served else math.nan,
            quality=float(self.quality[ok].mean()) if served else math.nan,
            by_model={name: int((self.model == m).sum()) for m, name in enumerate(self.models)},
            busy_share=dict(self.busy_share),
            duration_s=self.duration_s,
        )


# -- over seeds -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Interval:
    """The median of per-seed values and a distribution-free confidence interval for it.

    The interval is a pair of order statistics ``(x[k], x[n - 1 - k])`` of the ``n`` finite
    values, the narrowest whose coverage of the median under a Binomial(n, 1/2) is at least the
    confidence asked for (with 10 seeds: the 2nd and 9th smallest, 97.9%). With fewer than 6
    values no pair reaches 95% and the interval is the range. NaN when no value is finite.
    """

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float], confidence: float = 0.95) -> Interval:
        xs = sorted(v for v in values if math.isfinite(v))
        n = len(xs)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        median = float(np.median(xs))
        k = 0
        # Largest k with P(k < B < n - k) >= confidence, B ~ Binomial(n, 1/2) (0-based ranks).
        while k + 1 < n - 1 - (k + 1):
            tail = sum(math.comb(n, j) for j in range(k + 2)) / 2.0**n
            if 1.0 - 2.0 * tail < confidence:
                break
            k += 1
        return cls(median, xs[k], xs[n - 1 - k], n)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {
            "median": clean(self.median),
            "ci95": [clean(self.low), clean(self.high)],
            "n": self.n,
        }

    def __format__(self, spec: str) -> str:
        if not math.isfinite(self.median):
            return "-"
        return f"{format(self.median, spec)} [{format(self.low, spec)}, {format(self.high, spec)}]"
