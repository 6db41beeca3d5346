"""The router's table built from specs, its parameters, and the auto-kind classifier."""

from __future__ import annotations

import pytest

from zeta import Classification, ConfigError, DynamicPolicy, HeuristicClassifier, Kind, ModelSpec
from zeta._router import Router, build_candidates, device_group
from zeta._types import KIND_INDEX, SCORING_FIELDS, SERVED_KINDS, Scoring


def specs() -> list[ModelSpec]:
    return [
        ModelSpec(
            "coder", kinds={"simple", "code", "reason"}, preferred={"simple", "code"}, replicas=2
        ),
        ModelSpec("reasoner", kinds={"simple", "code", "reason"}, preferred={"reason"}, quality=0),
        ModelSpec("small", kinds={"simple"}, quality=2),
        ModelSpec("embedder", kinds={"embed"}),
    ]


def make_router(**kwargs: float) -> Router:
    return Router(build_candidates(specs(), 8), DynamicPolicy(), scoring=Scoring(**kwargs))


def test_one_candidate_per_replica_in_model_order() -> None:
    cands = build_candidates(specs(), 8)
    assert [(c.index, c.model, c.replica) for c in cands] == [
        (0, "coder", 0), (1, "coder", 1), (2, "reasoner", 0), (3, "small", 0), (4, "embedder", 0),
    ]  # fmt: skip
    assert all(c.capacity == 8 for c in cands)


def test_capability_and_penalties_come_from_the_specs() -> None:
    router = make_router(spill_penalty=1.5, quality_penalty=0.25)
    table = router.table
    assert table.capability(0, KIND_INDEX[Kind.CODE]) == (True, 0.0)
    assert table.capability(0, KIND_INDEX[Kind.REASON]) == (True, 1.5)  # capable, not preferred
    assert table.capability(0, KIND_INDEX[Kind.EMBED])[0] is False
    assert table.capability(3, KIND_INDEX[Kind.SIMPLE]) == (True, 0.5)  # quality rank 2
    assert table.capability(4, KIND_INDEX[Kind.EMBED]) == (True, 0.0)
    assert router.capable[Kind.EMBED] == (4,)
    assert router.capable[Kind.REASON] == (0, 1, 2)


def test_devices_and_co_load_come_from_the_specs_and_scoring() -> None:
    """Models on the host CPU share one device; each GPU index is a device of its own."""
    models = [
        ModelSpec("cpu-a"),
        ModelSpec("gpu0-a", device=0, replicas=2),
        ModelSpec("cpu-b"),
        ModelSpec("gpu1", device=1),
        ModelSpec("gpu0-b", device=0),
    ]
    cands = build_candidates(models, 8)
    assert [c.device for c in cands] == [None, 0, 0, None, 1, 0]
    router = Router(cands, DynamicPolicy(), scoring=Scoring(harm_weight=0.5, co_slow=0.75))
    table = router.table
    assert [table.device(i) for i in range(table.n)] == [0, 1, 1, 0, 2, 1]
    assert [device_group(d) for d in (None, 0, 1, 1024)] == [0, 1, 2, 1025]
    assert {table.co_slow(i) for i in range(table.n)} == {0.75}
    assert table.harm_weight == 0.5


def test_a_busy_model_makes_its_device_neighbours_dearer() -> None:
    """The router prices co-load: with the CPU coder busy, a reasoner on the same CPU costs
    more than the same reasoner on a GPU of its own."""
    from zeta import RouteRequest

    def reasoner_cost(device: int | None) -> float:
        models = [ModelSpec("coder", kinds={"code"}), ModelSpec("reasoner", device=device)]
        router = Router(build_candidates(models, 8), DynamicPolicy())
        for i in range(2):
            router.table.set_slots(i, 4)
            router.table.observe(i, 0.5, 0.01, 0.0)
        router.table.set_load(0, 0, 4)
        costs = [0.0, 0.0]
        request = RouteRequest(Kind.CODE, KIND_INDEX[Kind.CODE], 100.0)
        router.table.choose(request.kind_index, request.est_tokens, costs)
        return costs[1]

    assert reasoner_cost(None) > reasoner_cost(0) == 1.5


def test_preferred_model_per_kind() -> None:
    router = make_router()
    assert router.preferred == {
        Kind.SIMPLE: "coder", Kind.CODE: "coder", Kind.EMBED: "embedder", Kind.REASON: "reasoner",
    }  # fmt: skip


def test_fallback_is_the_kernel_and_skips_unavailable_rows() -> None:
    from zeta import RouteRequest

    router = make_router()
    request = RouteRequest(Kind.REASON, KIND_INDEX[Kind.REASON], 8.0)
    assert router.fallback(request) == 2
    router.table.set_available(2, False)
    assert router.fallback(request) in (0, 1)
    for i in (0, 1):
        router.table.set_available(i, False)
    assert router.fallback(request) is None


def test_retry_after_is_the_soonest_expected_completion() -> None:
    router = make_router()
    router.table.observe(0, 0.5, 0.01, 0.0)
    router.table.observe(1, 0.2, 0.01, 0.0)
    assert router.retry_after(Kind.CODE, 10.0, [0, 1]) == pytest.approx(0.3)
    assert router.retry_after(Kind.CODE, 10.0, []) == 1.0
    assert router.retry_after(Kind.CODE, 10.0, [2]) == 0.001  # no estimate yet: the floor


def test_apply_params() -> None:
    router = make_router()
    assert set(router.scoring.as_dict()) == set(SCORING_FIELDS)
    applied = router.apply({"tau": 2.0, "contention_weight": 3, "spill_penalty": 0.0})
    assert applied == Scoring(tau=2.0, contention_weight=3.0, spill_penalty=0.0)
    assert router.scoring == applied
    assert router.table.tau == 2.0 and router.table.weight == 3.0
    assert router.table.capability(0, KIND_INDEX[Kind.REASON]) == (True, 0.0)
    applied = router.apply({"harm_weight": 0.0, "co_slow": 1.0})
    assert (applied.harm_weight, applied.co_slow, applied.tau) == (0.0, 1.0, 2.0)
    assert router.table.harm_weight == 0.0
    assert all(router.table.co_slow(i) == 1.0 for i in range(router.table.n))


@pytest.mark.parametrize(
    "params",
    [
        {"nope": 1.0},
        {"tau": 0.0},
        {"contention_weight": -1.0},
        {"tau": float("nan")},
        {"spill_penalty": True},
        {"spill_penalty": 10**400},
        {"tau": float("inf")},
        {"co_slow": 10.5},
        {"harm_weight": -0.5},
    ],
)
def test_apply_params_rejects_everything_if_anything_is_wrong(params: dict[str, float]) -> None:
    router = make_router()
    before = router.scoring
    with pytest.raises(ConfigError):
        router.apply({"quality_penalty": 9.0, **params})
    assert router.scoring == before
    assert router.table.capability(3, KIND_INDEX[Kind.SIMPLE]) == (True, 0.5)
    assert router.table.co_slow(0) == before.co_slow


def test_no_models() -> None:
    with pytest.raises(ConfigError):
        Router([], DynamicPolicy())


# -- classifier -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "kind"),
    [
        ("Hi! How are you today?", Kind.SIMPLE),
        ("What is the capital of France?", Kind.SIMPLE),
        ("def add(a, b):\n    return a + b\n\nAdd type hints to this function.", Kind.CODE),
        ("Why does this raise TypeError?\n```python\nx = 1 + '2'\n```", Kind.CODE),
        ("Write a SQL query: SELECT name FROM users WHERE age > 30", Kind.CODE),
        ("Explain step by step why the sum of two odd numbers is even, and prove it.", Kind.REASON),
        (
            "Compare the trade-offs of two caching strategies and justify which to choose.",
            Kind.REASON,
        ),
    ],
)
def test_heuristic_kinds(prompt: str, kind: Kind) -> None:
    assert HeuristicClassifier().classify(prompt).kind is kind


def test_difficulty_grows_with_length_and_cues_and_stays_in_range() -> None:
    c = HeuristicClassifier()
    short = c.classify("Why?").difficulty
    long = c.classify("Why? " + "word " * 400).difficulty
    cued = c.classify("Why? Prove it step by step and compare and analyse.").difficulty
    assert 0.0 <= short < long <= 1.0
    assert short < cued <= 1.0
    assert c.classify("x " * 100_000).difficulty <= 1.0


def test_never_returns_auto_or_embed() -> None:
    c = HeuristicClassifier()
    for prompt in ("", "embed this", "a" * 10_000, "```"):
        verdict = c.classify(prompt)
        assert isinstance(verdict, Classification)
        assert verdict.kind in SERVED_KINDS and verdict.kind is not Kind.EMBED


def test_classifier_settings_are_validated() -> None:
    with pytest.raises(ConfigError):
        HeuristicClassifier(scan_chars=0)
    with pytest.raises(ConfigError):
        HeuristicClassifier(reason_threshold=2.0)
