"""Hostile input through every public entry point: only typed errors, at once, and zeta keeps serving.

Hypothesis throws values of every type at the request API (``complete``, ``stream``, ``embed``),
the ``Scheduler`` constructor and the value types (``ModelSpec``, ``Scoring``, ``Supervision``):
huge integers, NaN and infinities, lone surrogates, empty and oversized inputs, wrong types. A call
either works or raises :class:`~zeta.InvalidInputError` (``ConfigError`` for configuration); any
other exception is a bug. The scheduler under fire must still serve afterwards, and it must have
counted every request it was handed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeta import (
    ConfigError,
    InvalidInputError,
    ModelSpec,
    Scheduler,
    Scoring,
    Supervision,
    ZetaError,
)

#: Values of every kind a careless or hostile caller might pass.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64),
    st.just(10**400),
    st.just(-(10**400)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.just("\ud800"),
    st.just("ok\udfffok"),
    st.just("x" * 100_000),
    st.binary(max_size=8),
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.just("\ud800"), min_size=1, max_size=2),
    st.just(()),
    st.just({}),
    st.just(object()),
)

COMPLETION_OPTIONS = (
    "kind", "max_tokens", "priority", "deadline", "admission_timeout", "difficulty", "stop",
    "temperature", "seed", "bogus",
)  # fmt: skip

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[BlockingPortal, Scheduler]]:
    spec = ModelSpec("m", backend="simulated", slots=2, options={"output_tokens": 2})
    with start_blocking_portal("asyncio") as portal:
        zs = Scheduler([spec], admission_timeout=1.0)
        cm = portal.wrap_async_context_manager(zs)
        cm.__enter__()
        try:
            yield portal, zs
        finally:
            cm.__exit__(None, None, None)


def _counted(zs: Scheduler) -> int:
    return sum(zs.recorder.snapshot().requests.values())


@given(prompt=ANYTHING, options=st.dictionaries(st.sampled_from(COMPLETION_OPTIONS), ANYTHING))
@FUZZ
def test_complete_and_stream_take_anything(
    served: tuple[BlockingPortal, Scheduler], prompt: Any, options: dict[str, Any]
) -> None:
    portal, zs = served
    before = _counted(zs)
    try:
        portal.call(lambda: zs.complete(prompt, **options))
    except InvalidInputError:
        pass
    except ZetaError as exc:  # a valid request may still time out or be refused
        assert not isinstance(exc, ConfigError), exc
    assert _counted(zs) == before + 1
    try:
        portal.call(lambda: _stream_all(zs, prompt, options))
    except InvalidInputError:
        pass
    except ZetaError:
        pass
    assert portal.call(lambda: zs.complete("still serving", kind="simple")).text


async def _stream_all(zs: Scheduler, prompt: Any, options: dict[str, Any]) -> None:
    async with zs.stream(prompt, **options) as pieces:
        async for _ in pieces:
            pass


@given(texts=ANYTHING, options=st.dictionaries(st.sampled_from(COMPLETION_OPTIONS), ANYTHING))
@FUZZ
def test_embed_takes_anything(
    served: tuple[BlockingPortal, Scheduler], texts: Any, options: dict[str, Any]
) -> None:
    portal, zs = served
    before = _counted(zs)
    try:
        result = portal.call(lambda: zs.embed(texts, **options))
    except InvalidInputError:
        pass
    except ZetaError as exc:
        assert not isinstance(exc, ConfigError), exc
    else:
        assert len(result.vectors) == (1 if isinstance(texts, str) else len(texts))
    assert _counted(zs) == before + 1


SCHEDULER_ARGS = (
    "policy", "scoring", "classifier", "mailbox_capacity", "admission_timeout", "aging_s",
    "backend_factory", "worker", "supervision", "sampler", "sample_interval", "calibrator",
    "calibration_interval", "recorder", "seed", "clock",
)  # fmt: skip


@given(kwargs=st.dictionaries(st.sampled_from(SCHEDULER_ARGS), ANYTHING, max_size=3))
@FUZZ
def test_the_scheduler_constructor_takes_anything(kwargs: dict[str, Any]) -> None:
    spec = ModelSpec("m", backend="simulated")
    try:
        Scheduler([spec], **kwargs)
    except ConfigError:
        pass


@given(models=ANYTHING)
@FUZZ
def test_the_model_list_takes_anything(models: Any) -> None:
    try:
        Scheduler(models)
    except ConfigError:
        pass


SPEC_FIELDS = (
    "path", "kinds", "preferred", "quality", "replicas", "slots", "n_ctx", "n_threads",
    "n_gpu_layers", "device", "backend", "options", "optional",
)  # fmt: skip


@given(name=ANYTHING, fields=st.dictionaries(st.sampled_from(SPEC_FIELDS), ANYTHING, max_size=3))
@FUZZ
def test_model_specs_take_anything(name: Any, fields: dict[str, Any]) -> None:
    try:
        ModelSpec(name, **fields)
    except ConfigError:
        pass


@given(
    scoring=st.dictionaries(
        st.sampled_from(["tau", "contention_weight", "spill_penalty", "quality_penalty"]), ANYTHING
    ),
    supervision=st.dictionaries(
        st.sampled_from(
            ["max_restarts", "window_s", "backoff_initial_s", "backoff_max_s",
             "probe_interval_s", "hang_timeout_s", "shutdown_timeout_s"]
        ),
        ANYTHING,
    ),
)  # fmt: skip
@FUZZ
def test_parameter_values_take_anything(
    scoring: dict[str, Any], supervision: dict[str, Any]
) -> None:
    try:
        s = Scoring(**scoring)
    except ConfigError:
        pass
    else:
        assert all(math.isfinite(v) for v in s.as_dict().values())
    try:
        Supervision(**supervision)
    except ConfigError:
        pass


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classifier": -1},
        {"supervision": -1},
        {"recorder": "r"},
        {"clock": 3},
        {"backend_factory": -1},
        {"sampler": "s"},
        {"calibrator": 1},
        {"scoring": {"tau": 1}},
        {"aging_s": 10**400},
        {"admission_timeout": float("nan")},
        {"mailbox_capacity": 2**63},
        {"seed": -1},
    ],
)
def test_garbage_constructor_arguments_are_config_errors_naming_the_argument(
    kwargs: dict[str, Any],
) -> None:
    with pytest.raises(ConfigError) as info:
        Scheduler([ModelSpec("m", backend="simulated")], **kwargs)
    assert info.value.key == next(iter(kwargs))


def test_too_many_actors_is_a_config_error() -> None:
    specs = [ModelSpec(f"m{i}", backend="simulated", replicas=64) for i in range(5)]
    with pytest.raises(ConfigError, match="at most 256"):
        Scheduler(specs)
