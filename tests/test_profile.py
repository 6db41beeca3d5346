"""``zeta profile``: measuring the configured models on their real backends, as a simulator
fleet that ``zeta.sim`` loads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from zeta import Kind
from zeta.cli import main
from zeta.sim import Fleet, load_fleet
from zeta.sim._measure import fleet_toml, measure_fleet
from zeta.testing import ladder_spec


def test_measure_fleet_on_the_tiny_ladder_round_trips_through_toml(tmp_path: Path) -> None:
    specs = [ladder_spec(n, slots=3) for n in ("embedder-tiny", "coder-tiny", "reasoner-tiny")]
    lines: list[str] = []
    fleet = measure_fleet(specs, rounds=1, steps=3, report=lines.append)
    assert [m.name for m in fleet.models] == ["embedder-tiny", "coder-tiny", "reasoner-tiny"]
    for model in fleet.models:
        profile = model.profile
        assert model.spec.backend == "simulated"
        assert profile.slots == 3 and all(s > 0 for s in profile.step_s)
        assert list(profile.step_s) == sorted(profile.step_s)  # never cheaper with more work
        assert profile.coload[0] == 1.0 and profile.prefill_token_s >= 0.0
    coder = fleet.model("coder-tiny").profile
    assert len(coder.coload) == 3  # beside one, then both of the reasoner and the embedder
    # Measured on a live scheduler: never faster with more of the others busy.
    for model in fleet.models:
        coload = model.profile.coload
        assert len(coload) == 3 and list(coload) == sorted(coload)
    assert fleet.model("coder-tiny").spec.preferred == frozenset({Kind.SIMPLE, Kind.CODE})
    assert any("coload" in line for line in lines)
    text = fleet_toml(fleet)
    assert Fleet.from_dict(tomllib.loads(text)) == fleet
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    assert load_fleet(path) == fleet


def test_zeta_profile_writes_a_fleet_file(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    config = tmp_path / "zeta.toml"
    config.write_text(
        f"""
[scheduler]
kinds = ["simple", "code", "reason"]

[[models]]
name = "coder"
path = "{tiny_models["coder-tiny"]}"
kinds = ["simple", "code", "reason"]
slots = 2
"""
    )
    out = tmp_path / "profile.toml"
    assert (
        main(
            ["profile", "--config", str(config), "--out", str(out), "--rounds", "1", "--steps", "2"]
        )
        == 0
    )
    fleet = load_fleet(out)
    (coder,) = fleet.models
    assert coder.name == "coder" and coder.profile.slots == 2
    assert main(["profile", "--config", str(config), "--rounds", "0"]) == 2


def test_a_profile_seeds_a_fresh_scheduler_s_estimates() -> None:
    from zeta import ConfigError, ModelSpec, Scheduler, ServicePrior
    from zeta.sim import ladder_fleet

    fleet = ladder_fleet(slots=4)
    priors = fleet.priors()
    coder = priors["coder"]
    assert coder.token_s == fleet.model("coder").profile.step_s[0]
    assert coder.step_slope is not None and coder.step_slope > 0
    assert coder.co_slow is not None and coder.co_slow > 0
    specs = [
        ModelSpec(m.name, backend="simulated", kinds=m.spec.kinds, preferred=m.spec.preferred,
                  slots=4)
        for m in fleet.models
    ]  # fmt: skip
    zs = Scheduler(specs, priors=priors)
    row = zs._router.rows["coder"][0]
    table = zs._router.table
    assert table.ewma(row) == (coder.first_token_s, coder.token_s)
    assert table.step_slope(row) == coder.step_slope
    assert abs(table.co_slow(row) - coder.co_slow) < 1e-6  # the kernel quantises it
    with pytest.raises(ConfigError, match="no configured model"):
        Scheduler(specs, priors={"nosuch": coder})
    with pytest.raises(ConfigError, match="ServicePrior"):
        Scheduler(specs, priors={"coder": (0.1, 0.01)})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="token_s"):
        ServicePrior(0.1, -1.0)


def test_zeta_serve_takes_a_profile_and_names_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "zeta.toml"
    config.write_text(
        '[scheduler]\nkinds = ["embed"]\n\n'
        '[[models]]\nname = "m"\nbackend = "simulated"\nkinds = ["embed"]\n'
    )
    assert main(["serve", "--config", str(config), "--profile", str(tmp_path / "none.toml")]) == 1
    assert "profile: cannot read the profile" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]]\nname = 'm'\n")
    assert main(["serve", "--config", str(config), "--profile", str(bad)]) == 1
    assert "models[0]" in capsys.readouterr().err  # the profile's key path
