"""What the simulator replays: requests with their true sizes, and the shapes they are drawn from."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from .._exceptions import ConfigError
from .._types import Kind, Priority

__all__ = ["DEFAULT_SHAPES", "HEAVY_SHAPES", "Shape", "SimRequest"]


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a simulated workload, ``at`` seconds after the start.

    Args:
        kind: a served kind (not ``AUTO``).
        prompt_tokens: prompt length; prefill costs the model's per-token prefill time each.
        output_tokens: tokens it really generates (``0`` for an embedding).
        max_tokens: what the caller asks for, which is all the router knows of the length (its
            ``est_tokens``); at least ``output_tokens``. ``0`` for an embedding.
        priority: mailbox priority class.
        difficulty: ``[0, 1]`` hint for policies (``threshold`` keeps hard reasoning on
            reasoning models).
    """

    at: float
    kind: Kind
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    priority: Priority = Priority.NORMAL
    difficulty: float = 0.5

    def __post_init__(self) -> None:
        if self.kind is Kind.AUTO or not isinstance(self.kind, Kind):
            raise ConfigError(f"must be a served kind, got {self.kind!r}", key="kind")
        if not (math.isfinite(self.at) and self.at >= 0.0):
            raise ConfigError(f"must be a finite time >= 0, got {self.at!r}", key="at")
        if not 0 <= self.output_tokens <= self.max_tokens or self.prompt_tokens < 0:
            raise ConfigError(
                "need prompt_tokens >= 0 and 0 <= output_tokens <= max_tokens, got "
                f"{self.prompt_tokens}, {self.output_tokens}, {self.max_tokens}",
                key="output_tokens",
            )


@dataclass(frozen=True, slots=True)
class Shape:
    """How long one kind's requests are, in tokens.

    With ``tail == 0`` the prompt and ``max_tokens`` are uniform integers in their ranges and a
    request generates a uniform share ``output`` of its ``max_tokens`` (at least one token;
    none when ``max_tokens`` is 0, an embedding). With ``tail > 0`` the lengths are heavy-tailed:
    the prompt and the output are lognormal with that sigma around the uniform case's means,
    capped at ``cap`` times those means, and every request asks for the cap as ``max_tokens``
    (a client that sets one generous limit).
    """

    prompt: tuple[int, int]
    max_tokens: tuple[int, int]
    output: tuple[float, float] = (0.5, 1.0)
    tail: float = 0.0
    cap: float = 16.0

    def draw(self, rng: random.Random) -> tuple[int, int, int]:
        """``(prompt_tokens, output_tokens, max_tokens)`` of one request."""
        plo, phi = self.prompt
        mlo, mhi = self.max_tokens
        if self.tail <= 0.0:
            prompt = rng.randint(plo, phi)
            mt = rng.randint(mlo, mhi)
            if mt == 0:
                return prompt, 0, 0
            return prompt, max(1, round(mt * rng.uniform(*self.output))), mt
        s = self.tail
        mean_p = (plo + phi) / 2.0
        # Lognormal with the given mean: median = mean * exp(-s^2 / 2).
        scale = math.exp(-s * s / 2.0)
        prompt = min(
            round(self.cap * mean_p), max(1, round(mean_p * scale * rng.lognormvariate(0.0, s)))
        )
        if mhi == 0:
            return prompt, 0, 0
        mean_o = (mlo + mhi) / 2.0 * (self.output[0] + self.output[1]) / 2.0
        cap_o = max(1, round(self.cap * mean_o))
        out = min(cap_o, max(1, round(mean_o * scale * rng.lognormvariate(0.0, s))))
        return prompt, out, cap_o

    def means(self) -> tuple[float, float]:
        """Mean prompt and output tokens (of a fixed-seed sample of 20,000 draws)."""
        return _means(self)


@functools.cache
def _means(shape: Shape) -> tuple[float, float]:
    rng = random.Random(12345)
    n = 20_000
    p = o = 0
    for _ in range(n):
        a, b, _ = shape.draw(rng)
        p += a
        o += b
    return p / n, o / n


#: Request shapes per kind.
DEFAULT_SHAPES: Mapping[Kind, Shape] = {
    Kind.SIMPLE: Shape((8, 32), (8, 32)),
    Kind.CODE: Shape((16, 64), (16, 64)),
    Kind.EMBED: Shape((32, 256), (0, 0)),
    Kind.REASON: Shape((32, 96), (48, 128)),
}

#: The same means with heavy-tailed prompt and output lengths (lognormal, sigma 1.2).
HEAVY_SHAPES: Mapping[Kind, Shape] = {
    k: Shape(s.prompt, s.max_tokens, s.output, tail=1.2) for k, s in DEFAULT_SHAPES.items()
}
