"""Type stub for the compiled scoring kernel (built from ``native/_scoring_c.pyx``).

Same API and semantics as :mod:`zeta._scoring_py`, which documents them.
"""

from collections.abc import MutableSequence, Sequence
from typing import Final, Self, final

NO_CANDIDATE: Final[int]
UTIL_CAP: Final[float]
MAX_COUNT: Final[int]
MAX_COST: Final[float]

__all__ = [
    "MAX_COST",
    "MAX_COUNT",
    "NO_CANDIDATE",
    "ScoreTable",
    "contention",
    "peak_ewma",
    "score",
]

def contention(util: float, weight: float = 1.0) -> float: ...
def peak_ewma(old: float, sample: float, dt: float, tau: float) -> float: ...
def score(
    queue: Sequence[int],
    in_flight: Sequence[int],
    ewma_req: Sequence[float],
    ewma_tok: Sequence[float],
    util: Sequence[float],
    capable: Sequence[int],
    penalty: Sequence[float],
    available: Sequence[int],
    est_tokens: float,
    rotation: int = 0,
    costs: MutableSequence[float] | None = None,
    *,
    weight: float = 1.0,
) -> int: ...

@final
class ScoreTable:
    # The arguments go to __cinit__ (tp_new), which allocates the C arrays.
    def __new__(
        cls, n: int, n_kinds: int, *, seed: int = 0, tau: float = 5.0, weight: float = 1.0
    ) -> Self: ...
    @property
    def n(self) -> int: ...
    @property
    def n_kinds(self) -> int: ...
    @property
    def tau(self) -> float: ...
    @property
    def weight(self) -> float: ...
    def set_params(self, *, tau: float | None = None, weight: float | None = None) -> None: ...
    def set_capability(self, i: int, kind: int, capable: bool, penalty: float = 0.0) -> None: ...
    def set_available(self, i: int, available: bool) -> None: ...
    def set_load(self, i: int, queue: int, in_flight: int) -> None: ...
    def add_load(self, i: int, queue: int, in_flight: int) -> None: ...
    def set_util(self, i: int, util: float) -> None: ...
    def set_ewma(
        self, i: int, per_request: float, per_token: float,
        now: float,
    ) -> None: ...  # fmt: skip
    def observe(
        self, i: int, per_request: float, per_token: float,
        now: float,
    ) -> None: ...  # fmt: skip
    def load(self, i: int) -> tuple[int, int]: ...
    def ewma(self, i: int) -> tuple[float, float]: ...
    def util(self, i: int) -> float: ...
    def available(self, i: int) -> bool: ...
    def capability(self, i: int, kind: int) -> tuple[bool, float]: ...
    def cost(self, i: int, kind: int, est_tokens: float) -> float: ...
    def choose(
        self,
        kind: int,
        est_tokens: float,
        costs: MutableSequence[float] | None = None,
    ) -> int: ...
    def choose_batch(
        self,
        kinds: Sequence[int],
        est_tokens: Sequence[float],
        out: MutableSequence[int],
        reserve: bool = True,
    ) -> int: ...
