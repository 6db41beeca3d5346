"""Type stub for the compiled scoring kernel (built from ``native/_scoring_c.pyx``).

Same API and semantics as :mod:`zeta._scoring_py`, which documents them.
"""

from collections.abc import MutableSequence
from typing import Final, Self, final

NO_CANDIDATE: Final[int]
UTIL_CAP: Final[float]
MAX_COUNT: Final[int]
MAX_COST: Final[float]
MAX_SLOTS: Final[int]
DEFAULT_STEP_SLOPE: Final[float]
MAX_STEP_SLOPE: Final[float]
DEFAULT_CO_SLOW: Final[float]
MAX_CO_SLOW: Final[float]
CO_SLOW_QUANTUM: Final[float]

__all__ = [
    "CO_SLOW_QUANTUM",
    "DEFAULT_CO_SLOW",
    "DEFAULT_STEP_SLOPE",
    "MAX_CO_SLOW",
    "MAX_COST",
    "MAX_COUNT",
    "MAX_SLOTS",
    "MAX_STEP_SLOPE",
    "NO_CANDIDATE",
    "ScoreTable",
]

@final
class ScoreTable:
    # The arguments go to __cinit__ (tp_new), which allocates the C arrays.
    def __new__(
        cls,
        n: int,
        n_kinds: int,
        *,
        seed: int = 0,
        tau: float = 5.0,
        weight: float = 1.0,
        harm_weight: float = 1.0,
        co_slow: float = 0.5,
    ) -> Self: ...
    @property
    def n(self) -> int: ...
    @property
    def n_kinds(self) -> int: ...
    @property
    def tau(self) -> float: ...
    @property
    def weight(self) -> float: ...
    @property
    def harm_weight(self) -> float: ...
    def set_params(
        self,
        *,
        tau: float | None = None,
        weight: float | None = None,
        harm_weight: float | None = None,
    ) -> None: ...
    def set_capability(self, i: int, kind: int, capable: bool, penalty: float = 0.0) -> None: ...
    def set_available(self, i: int, available: bool) -> None: ...
    def set_load(self, i: int, queue: int, in_flight: int) -> None: ...
    def set_slots(self, i: int, slots: int) -> None: ...
    def set_step_slope(self, i: int, slope: float) -> None: ...
    def set_device(self, i: int, device: int) -> None: ...
    def set_co_slow(self, i: int, co_slow: float) -> None: ...
    def set_util(self, i: int, util: float) -> None: ...
    def observe(
        self, i: int, per_request: float, per_token: float,
        now: float, busy: int = 1,
    ) -> None: ...  # fmt: skip
    def load(self, i: int) -> tuple[int, int]: ...
    def slots(self, i: int) -> int: ...
    def step_slope(self, i: int) -> float: ...
    def ewma(self, i: int) -> tuple[float, float]: ...
    def util(self, i: int) -> float: ...
    def device(self, i: int) -> int: ...
    def co_slow(self, i: int) -> float: ...
    def available(self, i: int) -> bool: ...
    def capability(self, i: int, kind: int) -> tuple[bool, float]: ...
    def choose(
        self,
        kind: int,
        est_tokens: float,
        costs: MutableSequence[float] | None = None,
    ) -> int: ...
