"""``zeta profile``: measuring the configured models on their real backends, as a simulator
fleet that ``zeta.sim`` loads."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
