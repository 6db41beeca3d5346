"""The simulated backend: its service-time model, determinism, streaming and failure injection."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from zeta import BackendError, ConfigError, ModelLoadError, ModelSpec
from zeta.backends import get_backend
from zeta.backends._base import CompletionParams
from zeta.backends.simulated import (
    TRACE_LEN,
    FailurePlan,
    SimulatedBackend,
    SimulatedCrash,
    open_backend,
)


def spec(**options: Any) -> ModelSpec:
    return ModelSpec("sim", backend="simulated", options=options)


def test_loaded_by_name() -> None:
    assert get_backend("simulated") is open_backend


def test_completion_shape_and_determinism() -> None:
    a = open_backend(spec(), 0).complete(CompletionParams("hello there", max_tokens=5))
    b = open_backend(spec(), 1).complete(CompletionParams("hello there", max_tokens=5))
    assert a.text == b.text and a.completion_tokens == 5 and a.finish_reason == "length"
    assert a.prompt_tokens == 3  # ~4 characters per token
    assert 0.0 <= a.first_token_s <= a.service_s
    short = open_backend(spec(output_tokens=2), 0).complete(CompletionParams("x", max_tokens=5))
    assert short.completion_tokens == 2


def test_service_time_blocks_the_calling_thread_for_at_least_the_model() -> None:
    backend = open_backend(spec(base_s=0.01, per_prompt_token_s=0.001, per_output_token_s=0.002), 0)
    c = backend.complete(CompletionParams("abcdefgh", max_tokens=3))  # 2 prompt tokens
    assert c.service_s >= 0.01 + 2 * 0.001 + 3 * 0.002
    assert c.first_token_s >= 0.01 + 2 * 0.001 + 0.002


def test_jitter_is_seeded_per_replica() -> None:
    def factors(seed: int, replica: int) -> list[float]:
        b = SimulatedBackend(spec(jitter=0.5, seed=seed), replica)
        return [b._factor() for _ in range(5)]

    assert factors(1, 0) == factors(1, 0)
    assert factors(1, 0) != factors(1, 1) != factors(2, 1)
    assert all(0.5 <= f <= 1.5 for f in factors(3, 0))


def test_streaming_stops_when_the_callback_says_so() -> None:
    seen: list[str] = []

    def on_token(piece: str) -> bool:
        seen.append(piece)
        return len(seen) < 3

    c = open_backend(spec(), 0).complete(CompletionParams("p", max_tokens=100), on_token)
    assert (c.finish_reason, c.completion_tokens, len(seen)) == ("cancelled", 3, 3)
    assert c.text == "".join(seen)


def test_embeddings_are_deterministic_unit_vectors() -> None:
    backend = open_backend(spec(embed_dim=12), 0)
    e = backend.embed(["alpha", "beta", "alpha"])
    assert len(e.vectors) == 3 and all(len(v) == 12 for v in e.vectors)
    assert e.vectors[0] == e.vectors[2] != e.vectors[1]
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in e.vectors)


def test_gate_and_call_trace() -> None:
    gate, calls = threading.Event(), []
    backend = open_backend(spec(gate=gate, on_call=lambda op, text: calls.append((op, text))), 0)
    t = threading.Thread(target=backend.embed, args=(["x"],))
    t.start()
    t.join(0.05)
    assert t.is_alive() and calls == []
    gate.set()
    t.join()
    assert calls == [("embed", "x")] and list(backend.calls) == [("embed", "x")]


def test_the_call_trace_is_bounded() -> None:
    backend = open_backend(spec(), 0)
    for i in range(TRACE_LEN + 5):
        backend.embed([f"t{i}"])
    assert len(backend.calls) == TRACE_LEN and backend.calls[-1] == ("embed", f"t{TRACE_LEN + 4}")


def test_scripted_failures_span_contexts_and_restarts() -> None:
    plan = FailurePlan(script=["error", "raise", "die", "ok"])
    first, second = open_backend(spec(failures=plan), 0), open_backend(spec(failures=plan), 1)
    params = CompletionParams("p", max_tokens=1)
    with pytest.raises(BackendError):
        first.complete(params)
    with pytest.raises(SimulatedCrash):
        second.complete(params)
    with pytest.raises(SimulatedCrash):
        first.complete(params)  # dies
    with pytest.raises(SimulatedCrash, match="dead"):
        first.complete(params)  # stays dead, without drawing from the plan
    assert second.complete(params).completion_tokens == 1  # draws the last entry, "ok"
    assert second.complete(params).completion_tokens == 1  # the script is used up
    assert plan.calls == 5


def test_midstream_failure_happens_after_the_first_token() -> None:
    plan = FailurePlan(script=["midstream"])
    pieces: list[str] = []
    with pytest.raises(SimulatedCrash):
        open_backend(spec(failures=plan), 0).complete(
            CompletionParams("p", max_tokens=5), lambda p: pieces.append(p) is None
        )
    assert len(pieces) == 1


def test_hang_blocks_then_raises() -> None:
    backend = open_backend(spec(failures=FailurePlan(script=["hang"], hang_s=0.01)), 0)
    with pytest.raises(SimulatedCrash, match="hung"):
        backend.complete(CompletionParams("p", max_tokens=1))


def test_probabilities_are_seeded() -> None:
    def outcomes(seed: int) -> list[str]:
        plan = FailurePlan(p_error=0.2, p_raise=0.2, p_die=0.1, p_hang=0.1, seed=seed)
        return [plan.next_call() for _ in range(200)]

    assert outcomes(4) == outcomes(4) != outcomes(5)
    assert set(outcomes(4)) == {"ok", "error", "raise", "die", "hang"}


def test_open_failures() -> None:
    plan = FailurePlan(open_script=["fail", "ok"])
    with pytest.raises(ModelLoadError):
        open_backend(spec(failures=plan), 0)
    assert open_backend(spec(failures=plan), 0) is not None
    with pytest.raises(ModelLoadError):
        open_backend(spec(failures={"p_open_fail": 1.0}), 0)


@pytest.mark.parametrize(
    "options",
    [
        {"base_s": -1},
        {"per_output_token_s": float("inf")},
        {"jitter": 1.0},
        {"seed": "x"},
        {"output_tokens": 0},
        {"embed_dim": 0},
        {"gate": object()},
        {"on_call": 3},
        {"failures": 3},
        {"failures": {"p_raise": 0.7, "p_die": 0.7}},
        {"failures": {"script": ["explode"]}},
        {"failures": {"no_such_field": 1}},
    ],
)
def test_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        open_backend(spec(**options), 0)
