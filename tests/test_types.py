"""The self-validating values: every bad field is a ConfigError naming it, at construction."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zeta import ConfigError, Kind, ModelSpec, Supervision, _scoring_py
from zeta._types import (
    MAX_CO_SLOW,
    MAX_STEP_SLOPE,
    MODEL_INT_RANGES,
    SCORING_FIELDS,
    Scoring,
    check_int,
    check_number,
    parse_kinds,
    shown,
)

HUGE = 10**400
HOSTILE: list[object] = [
    None, True, "1", 1.5, math.nan, math.inf, -math.inf, HUGE, -HUGE, 10**5000, [1], {"a": 1},
    object(),
]  # fmt: skip


def test_defaults_and_normal_values() -> None:
    spec = ModelSpec("m")
    assert spec.kinds == frozenset(Kind) - {Kind.AUTO} and spec.preferred == spec.kinds
    assert (spec.path, spec.device, spec.options, spec.optional) == (None, None, {}, False)
    # Path-likes and kind names are accepted and normalised to the annotated types.
    loose: dict[str, Any] = {"path": Path("/x.gguf"), "kinds": ["code", Kind.SIMPLE]}
    spec = ModelSpec("m", preferred=frozenset({Kind.CODE}), **loose)
    assert spec.path == "/x.gguf" and spec.file == Path("/x.gguf")
    assert spec.kinds == {Kind.CODE, Kind.SIMPLE} and spec.preferred == {Kind.CODE}


@pytest.mark.parametrize(("field", "bounds"), MODEL_INT_RANGES.items())
def test_integer_fields_take_their_documented_range(field: str, bounds: tuple[int, int]) -> None:
    low, high = bounds
    for good in (low, high):
        fields: dict[str, Any] = {field: good}
        assert getattr(ModelSpec("m", **fields), field) == good
    for value in (low - 1, high + 1, HUGE, -HUGE, 10**5000, 2**32 + 256, True, 1.0, "1",
                  math.nan, math.inf):  # fmt: skip
        fields = {field: value}
        with pytest.raises(ConfigError) as info:
            ModelSpec("m", **fields)
        assert info.value.key == field


def test_n_ctx_never_wraps() -> None:
    with pytest.raises(
        ConfigError, match=r"n_ctx: must be between 16 and 16777216, got 4294967552"
    ):
        ModelSpec("m", n_ctx=2**32 + 256)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"path": 1}, "path"),
        ({"path": ""}, "path"),
        ({"path": "a\0b"}, "path"),
        ({"path": b"/x.gguf"}, "path"),
        ({"options": None, "path": 1}, "path"),
        ({"options": None}, "options"),
        ({"options": [("a", 1)]}, "options"),
        ({"options": {1: "a"}}, "options"),
        ({"kinds": None}, "kinds"),
        ({"kinds": "code"}, "kinds"),
        ({"kinds": 3}, "kinds"),
        ({"kinds": {"code": 1}}, "kinds"),
        ({"kinds": []}, "kinds"),
        ({"kinds": ["auto"]}, "kinds"),
        ({"kinds": [["code"]]}, "kinds"),
        ({"preferred": True}, "preferred"),
        ({"preferred": None}, "preferred"),
        ({"kinds": ["code"], "preferred": ["embed"]}, "preferred"),
        ({"backend": 5}, "backend"),
        ({"backend": None}, "backend"),
        ({"backend": ""}, "backend"),
        ({"optional": "yes"}, "optional"),
        ({"optional": 1}, "optional"),
    ],
)
def test_bad_fields_are_config_errors_naming_the_field(kwargs: dict[str, Any], key: str) -> None:
    fields = {"name": "m", **kwargs}
    with pytest.raises(ConfigError) as info:
        ModelSpec(**fields)
    assert info.value.key == key
    assert str(info.value) == f"{key}: {info.value.message}"


_FIELDS = [
    "name",
    "path",
    "kinds",
    "preferred",
    *MODEL_INT_RANGES,
    "backend",
    "options",
    "optional",
]


@given(field=st.sampled_from(_FIELDS), value=st.sampled_from(HOSTILE))
def test_hostile_values_raise_only_config_errors(field: str, value: object) -> None:
    fields: dict[str, Any] = {"name": "m", field: value}
    try:
        ModelSpec(**fields)
    except ConfigError as exc:
        assert exc.key == field
        assert len(str(exc)) < 300  # a huge value is described, not printed


def test_config_error_under_adds_the_key_path() -> None:
    err = ConfigError("must be between 1 and 64, got 0", key="replicas").under("models[2]")
    assert (err.key, err.message) == ("models[2].replicas", "must be between 1 and 64, got 0")
    assert str(err) == "models[2].replicas: must be between 1 and 64, got 0"
    assert ConfigError("bad").under("policy.params").key == "policy.params"


def test_shared_checks() -> None:
    assert check_int(5, "k", 0, 9) == 5
    assert check_number(3, "k", 0.0, 9.0) == 3.0 and isinstance(check_number(3, "k", 0, 9), float)
    with pytest.raises(ConfigError, match="k: must be a finite number > 0 and <= 9"):
        check_number(0, "k", 0.0, 9.0, low_open=True)
    assert parse_kinds(("code",), "k") == {Kind.CODE}
    assert shown(HUGE) == "an integer of 1329 bits" and shown(10**5000).startswith("an integer")
    assert shown("x" * 100).endswith("...") and shown(None) == "None" and shown(True) == "a boolean"


# -- Supervision (zeta/_supervisor.py) ------------------------------------------------------------

_SUPERVISION_FIELDS = [
    "max_restarts", "window_s", "backoff_initial_s", "backoff_max_s", "probe_interval_s",
    "hang_timeout_s", "shutdown_timeout_s",
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"max_restarts": 1001}, "max_restarts"),
        ({"max_restarts": True}, "max_restarts"),
        ({"max_restarts": 2.0}, "max_restarts"),
        ({"window_s": 0}, "window_s"),
        ({"window_s": math.inf}, "window_s"),
        ({"backoff_initial_s": -1}, "backoff_initial_s"),
        ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"),
        ({"backoff_max_s": HUGE}, "backoff_max_s"),
        ({"probe_interval_s": 1e6 + 1}, "probe_interval_s"),
        ({"hang_timeout_s": 0}, "hang_timeout_s"),
        ({"hang_timeout_s": math.nan}, "hang_timeout_s"),
        ({"shutdown_timeout_s": math.nan}, "shutdown_timeout_s"),
        ({"shutdown_timeout_s": "10"}, "shutdown_timeout_s"),
    ],
)
def test_supervision_fields_are_validated(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Supervision(**kwargs)
    assert info.value.key == key


def test_supervision_ranges_are_inclusive() -> None:
    top = Supervision(
        max_restarts=1000, window_s=1e6, backoff_initial_s=0, backoff_max_s=1e6,
        probe_interval_s=0, hang_timeout_s=None, shutdown_timeout_s=0,
    )  # fmt: skip
    assert top.max_restarts == 1000 and top.hang_timeout_s is None
    # The longest backoff the supervisor computes stays a finite float.
    assert math.isfinite(min(top.backoff_max_s, 1e6 * 2.0**top.max_restarts))


@given(field=st.sampled_from(_SUPERVISION_FIELDS), value=st.sampled_from(HOSTILE))
def test_supervision_hostile_values_raise_only_config_errors(field: str, value: object) -> None:
    fields: dict[str, Any] = {field: value}
    try:
        Supervision(**fields)
    except ConfigError as exc:
        assert exc.key == field


# -- Scoring ----------------------------------------------------------------------------------


def test_scoring_defaults_include_the_harm_terms() -> None:
    scoring = Scoring()
    assert (scoring.harm_weight, scoring.co_slow) == (1.0, 0.5)
    assert SCORING_FIELDS[-2:] == ("harm_weight", "co_slow")
    # co_slow's bound is the kernel's (both kernels export the same one).
    assert MAX_CO_SLOW == _scoring_py.MAX_CO_SLOW
    assert MAX_STEP_SLOPE == _scoring_py.MAX_STEP_SLOPE
    assert Scoring(harm_weight=0, co_slow=MAX_CO_SLOW).as_dict()["co_slow"] == 10.0


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [
        ({"harm_weight": -1.0}, "harm_weight", ">= 0 and <= 1e"),
        ({"harm_weight": math.inf}, "harm_weight", "finite number"),
        ({"harm_weight": "1"}, "harm_weight", "must be a number"),
        ({"co_slow": -0.1}, "co_slow", ">= 0 and <= 10"),
        ({"co_slow": 10.5}, "co_slow", ">= 0 and <= 10, got 10.5"),
        ({"co_slow": math.nan}, "co_slow", "finite number"),
        ({"co_slow": True}, "co_slow", "must be a number"),
    ],
)
def test_scoring_harm_fields_are_validated(kwargs: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Scoring(**kwargs)
    assert info.value.key == key
    with pytest.raises(ConfigError):
        Scoring().replace(kwargs)
