"""The TOML config file: the shipped example loads; every invalid input names its key."""

from __future__ import annotations

import json
import math
import tempfile
import textwrap
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import zeta
from zeta import ActorState, ConfigError, Kind, ModelUnavailable, Scheduler
from zeta._config import (
    MAX_CONFIG_BYTES,
    Config,
    MetricsConfig,
    ServeConfig,
    load_config,
    parse_config,
)
from zeta._types import Scoring
from zeta.testing import model_path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "zeta.toml"

MINIMAL = """
[[models]]
name = "all"
path = "m.gguf"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "zeta.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZETA_CACHE_DIR", str(tmp_path))
    config = load_config(EXAMPLE, make_models=False)
    assert [m.name for m in config.models] == ["embedder", "coder", "reasoner"]
    assert config.policy == "dynamic"
    assert config.mailbox_capacity == 64
    assert config.metrics == MetricsConfig(enabled=False, host="127.0.0.1", port=9464)
    assert config.optional == {"reasoner"}
    models = {m.name: m for m in config.models}
    assert models["reasoner"].optional and not models["coder"].optional
    coder = models["coder"]
    assert coder.preferred == {Kind.SIMPLE, Kind.CODE} and coder.quality == 1
    assert coder.path == str(model_path("coder"))
    assert models["reasoner"].options == {"n_batch": 256}
    assert config.policy_params == {}
    assert config.scoring == Scoring()  # the example spells out the defaults
    assert config.source == EXAMPLE


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    (model,) = config.models
    assert model.path == str(tmp_path / "m.gguf")  # relative to the config file
    assert model.kinds == frozenset({Kind.SIMPLE, Kind.CODE, Kind.EMBED, Kind.REASON})
    assert model.backend == "llama_cpp" and model.replicas == 1
    assert isinstance(config, Config) and config.policy == "dynamic"
    assert config.policy_params == {} and not config.metrics.enabled
    assert config.scoring == Scoring()


def test_full_model_entry(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path,
            """
            [scheduler]
            mailbox_capacity = 8
            kinds = ["code"]
            [policy]
            name = "threshold"
            params = { high = 0.9, low = 0.4 }
            [metrics]
            enabled = true
            port = 0
            [[models]]
            name = "gpu"
            path = "/abs/model.gguf"
            kinds = ["code", "simple"]
            preferred = ["code"]
            quality = 2
            replicas = 3
            n_ctx = 4096
            n_threads = 4
            n_gpu_layers = -1
            device = 1
            options = { n_batch = 128 }
            """,
        )
    )
    (m,) = config.models
    assert (m.path, m.quality, m.replicas, m.n_ctx, m.n_threads) == ("/abs/model.gguf", 2, 3,
                                                                     4096, 4)  # fmt: skip
    assert (m.n_gpu_layers, m.device, m.options) == (-1, 1, {"n_batch": 128})
    assert m.preferred == {Kind.CODE}
    assert config.kinds == {Kind.CODE} and config.mailbox_capacity == 8
    assert config.policy == "threshold"
    assert config.policy_params == {"high": 0.9, "low": 0.4}
    assert config.metrics == MetricsConfig(enabled=True, host="127.0.0.1", port=0)


def test_ladder_model_is_generated_and_takes_its_role(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZETA_CACHE_DIR", str(tiny_models["coder-tiny"].parent))
    config = parse_config(
        {
            "scheduler": {"kinds": ["embed", "code"]},
            "models": [
                {"name": "e", "ladder": "embedder-tiny"},
                {"name": "c", "ladder": "coder-tiny", "kinds": ["code", "reason"]},
            ],
        }
    )
    e, c = config.models
    assert e.kinds == {Kind.EMBED} and e.path == str(tiny_models["embedder-tiny"])
    assert c.kinds == {Kind.CODE, Kind.REASON}
    assert c.preferred == {Kind.CODE}  # the coder role's preferred kinds, narrowed to kinds


def test_simulated_models_need_no_path() -> None:
    config = parse_config(
        {"models": [{"name": "sim", "backend": "simulated", "options": {"per_token_s": 0.01}}]}
    )
    assert config.models[0].path is None
    assert config.models[0].options == {"per_token_s": 0.01}


def test_scheduler_kwargs_carry_scoring_and_the_policy_apart() -> None:
    models = [{"name": "m", "backend": "simulated"}]
    dynamic = parse_config({"scoring": {"spill_penalty": 2}, "models": models})
    kwargs = dynamic.scheduler_kwargs()
    assert set(kwargs) == {"models", "mailbox_capacity", "policy", "scoring"}
    assert kwargs["policy"] == "dynamic" and kwargs["scoring"] == Scoring(spill_penalty=2.0)
    assert kwargs["mailbox_capacity"] == 64 and [m.name for m in kwargs["models"]] == ["m"]
    threshold = parse_config(
        {"policy": {"name": "threshold", "params": {"high": 0.9, "low": 0.2}},
         "scoring": {"tau": 3}, "models": models}
    )  # fmt: skip
    kwargs = threshold.scheduler_kwargs()
    assert set(kwargs) == {"models", "mailbox_capacity", "policy", "scoring"}
    assert kwargs["policy"].name == "threshold" and kwargs["policy"].high == 0.9
    assert kwargs["scoring"] == Scoring(tau=3.0)
    harm = parse_config({"scoring": {"harm_weight": 0, "co_slow": 0.94}, "models": models})
    assert harm.scoring == Scoring(harm_weight=0.0, co_slow=0.94)


def test_model_errors_carry_the_entry_s_key_path() -> None:
    """ModelSpec names its field; the loader puts ``models[i]`` in front, message untouched."""
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [{"name": "a", "backend": "simulated"},
                                 {"name": "b", "backend": "simulated", "n_ctx": 8}]})  # fmt: skip
    assert info.value.key == "models[1].n_ctx"
    assert info.value.message == "must be between 16 and 16777216, got 8"
    assert str(info.value) == "models[1].n_ctx: must be between 16 and 16777216, got 8"


@pytest.mark.anyio
async def test_a_config_starts_a_scheduler_on_llama_cpp(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeta._scheduler import Scheduler

    monkeypatch.setenv("ZETA_CACHE_DIR", str(tiny_models["coder-tiny"].parent))
    config = parse_config(
        {
            "scheduler": {"mailbox_capacity": 4},
            "policy": {"name": "static"},
            "models": [
                {"name": "embedder", "ladder": "embedder-tiny", "n_ctx": 256},
                {"name": "coder", "ladder": "coder-tiny", "n_ctx": 256},
                {"name": "reasoner", "ladder": "reasoner-tiny", "n_ctx": 256},
            ],
        }
    )
    async with Scheduler(**config.scheduler_kwargs()) as zs:
        code = await zs.complete("def main():", kind=Kind.CODE, max_tokens=5)
        plan = await zs.complete("think it through", kind=Kind.REASON, max_tokens=5)
        vectors = await zs.embed(["a", "b"])
    assert (code.model, code.completion_tokens) == ("coder", 5)
    assert plan.model == "reasoner" and vectors.model == "embedder"
    assert len(vectors.vectors) == 2


def test_load_config_and_config_are_public() -> None:
    assert zeta.load_config is load_config and zeta.Config is Config


def test_optional_reaches_the_model_spec_and_the_scheduler_kwargs() -> None:
    config = parse_config(
        {
            "models": [
                {"name": "main", "backend": "simulated"},
                {"name": "extra", "backend": "simulated", "optional": True},
            ]
        }
    )
    assert config.optional == {"extra"}
    assert [m.optional for m in config.scheduler_kwargs()["models"]] == [False, True]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


SIMULATED = """
[policy]
name = "static"
[metrics]
enabled = {enabled}
port = 0
[[models]]
name = "m"
backend = "simulated"
"""


@pytest.mark.anyio
async def test_from_config_file_runs_it_and_serves_its_metrics_endpoint(tmp_path: Path) -> None:
    path = _write(tmp_path, SIMULATED.format(enabled="true"))
    async with Scheduler.from_config(path, policy="round_robin") as zs:  # overrides win
        assert zs.policy.name == "round_robin" and [m.name for m in zs.models] == ["m"]
        server = zs.metrics_server
        assert server is not None and server.host == "127.0.0.1" and server.port > 0
        await zs.complete("hello", kind="simple")
        text = await anyio.to_thread.run_sync(_scrape, server.url)
        assert 'zeta_scheduler_requests_total{kind="simple",model="m",outcome="ok"} 1.0' in text
        assert 'zeta_actor_state{model="m",replica="0",state="ready"} 1.0' in text
    assert zs.metrics_server is None
    with pytest.raises(urllib.error.URLError):  # the endpoint closed with the scheduler
        await anyio.to_thread.run_sync(_scrape, server.url)


@pytest.mark.anyio
async def test_from_config_serves_no_metrics_unless_enabled(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, SIMULATED.format(enabled="false")))
    async with Scheduler.from_config(config) as zs:
        assert zs.metrics_server is None and zs.policy.name == "static"
        assert (await zs.complete("hello", kind="simple")).model == "m"


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["truncated", "wrong magic"])
async def test_an_optional_model_with_a_bad_file_is_left_out_on_llama_cpp(
    tiny_models: dict[str, Path],
    tmp_path: Path,
    damage: str,
    captured_logs: list[dict[str, Any]],
) -> None:
    good = tiny_models["reasoner-tiny"].read_bytes()
    bad = tmp_path / "reasoner.gguf"
    bad.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"GGML" + good[4:])
    path = _write(
        tmp_path,
        f"""
        [policy]
        name = "static"
        [[models]]
        name = "embedder"
        path = "{tiny_models["embedder-tiny"]}"
        kinds = ["embed"]
        n_ctx = 256
        [[models]]
        name = "coder"
        path = "{tiny_models["coder-tiny"]}"
        kinds = ["simple", "code", "reason"]
        preferred = ["simple", "code"]
        n_ctx = 256
        [[models]]
        name = "reasoner"
        path = "reasoner.gguf"
        kinds = ["simple", "code", "reason"]
        preferred = ["reason"]
        n_ctx = 256
        optional = true
        """,
    )
    async with Scheduler.from_config(path) as zs:
        states = {m.name: m.state for m in zs.snapshot().models}
        assert states == {
            "embedder": ActorState.READY, "coder": ActorState.READY,
            "reasoner": ActorState.DOWN,
        }  # fmt: skip
        code = await zs.complete("def main():", kind=Kind.CODE, max_tokens=4)
        assert (code.model, code.completion_tokens) == ("coder", 4)
        # "static" reasons on the reasoner only: unavailable (try again later), not invalid.
        with pytest.raises(ModelUnavailable, match="reasoner"):
            await zs.complete("think it through", kind=Kind.REASON, max_tokens=4)
    (warning,) = [e for e in captured_logs if e["event"] == "model_load_failed"]
    assert (warning["model"], warning["path"]) == ("reasoner", str(bad))
    assert str(bad) in warning["error"]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("colour = 1\n" + MINIMAL, "colour", "unknown key"),
        ("[scheduler]\nmailbox_capacty = 4\n" + MINIMAL, "scheduler.mailbox_capacty",
         "did you mean 'mailbox_capacity'"),
        ("[[models]]\nname = 'a'\npath = 'a.gguf'\nn_ctxx = 5\n", "models[0].n_ctxx",
         "did you mean 'n_ctx'"),
        ("[scheduler]\nmailbox_capacity = '64'\n" + MINIMAL, "scheduler.mailbox_capacity",
         "must be an integer, got a string"),
        ("[scheduler]\nmailbox_capacity = 0\n" + MINIMAL, "scheduler.mailbox_capacity",
         "must be between 1 and 1048576"),
        ("[scheduler]\nmailbox_capacity = " + "9" * 400 + "\n" + MINIMAL,
         "scheduler.mailbox_capacity", "an integer of 1329 bits"),
        ("[scheduler]\nmailbox_capacity = true\n" + MINIMAL, "scheduler.mailbox_capacity",
         "got a boolean"),
        ("[metrics]\nport = 70000\n" + MINIMAL, "metrics.port", "between 0 and 65535"),
        ("[metrics]\nenabled = 'yes'\n" + MINIMAL, "metrics.enabled", "true or false"),
        ("[policy]\nname = 3\n" + MINIMAL, "policy.name", "non-empty string"),
        ("[policy.params]\nx = [1, 2]\n" + MINIMAL, "policy.params.x", "number, string or"),
        ("[policy]\nname = 'fastest'\n" + MINIMAL, "policy.name", "unknown policy 'fastest'"),
        ("[policy]\nname = 'threshold'\nparams = { hihg = 0.9 }\n" + MINIMAL,
         "policy.params.hihg", "takes no parameter 'hihg'"),
        ("[policy]\nname = 'static'\nparams = { high = 0.9 }\n" + MINIMAL,
         "policy.params.high", "takes no parameter 'high'"),
        ("[policy]\nname = 'threshold'\nparams = { high = 0.3, low = 0.6 }\n" + MINIMAL,
         "policy.params", "low < high"),
        ("[policy]\nname = 'threshold'\nparams = { backlog_s = 0 }\n" + MINIMAL,
         "policy.params.backlog_s", "must be a finite number > 0"),
        ("[policy.params]\nspill_penalty = 1\n" + MINIMAL, "policy.params.spill_penalty",
         "scoring parameters go in the [scoring] table"),
        ("[scoring]\nspill_penalty = -1\n" + MINIMAL, "scoring.spill_penalty", ">= 0"),
        ("[scoring]\ntau = 'slow'\n" + MINIMAL, "scoring.tau", "must be a number, got a string"),
        ("[scoring]\ntau = 0\n" + MINIMAL, "scoring.tau", "finite number > 0"),
        ("[scoring]\ntau = inf\n" + MINIMAL, "scoring.tau", "finite number > 0"),
        ("[scoring]\ntau = nan\n" + MINIMAL, "scoring.tau", "finite number > 0"),
        ("[scoring]\ntau = 1e400\n" + MINIMAL, "scoring.tau", "finite number > 0"),
        ("[scoring]\nquality_penalty = " + "1" * 400 + "\n" + MINIMAL,
         "scoring.quality_penalty", "finite number >= 0"),
        ("[scoring]\ncontention_weight = true\n" + MINIMAL, "scoring.contention_weight",
         "must be a number"),
        ("[scoring]\ntaux = 1\n" + MINIMAL, "scoring.taux", "did you mean 'tau'"),
        ("[scoring]\nco_slow = 11\n" + MINIMAL, "scoring.co_slow", ">= 0 and <= 10, got 11"),
        ("[scoring]\nco_slow = -1\n" + MINIMAL, "scoring.co_slow", ">= 0 and <= 10"),
        ("[scoring]\nharm_weight = 'high'\n" + MINIMAL, "scoring.harm_weight",
         "must be a number, got a string"),
        ("[scoring]\nharm_wieght = 1\n" + MINIMAL, "scoring.harm_wieght",
         "did you mean 'harm_weight'"),
        ("scoring = 1\n" + MINIMAL, "scoring", "must be a table"),
        ("policy = 'dynamic'\n" + MINIMAL, "policy", "must be a table"),
        ("[scheduler]\n", "models", "no models configured"),
        ("models = []\n", "models", "non-empty array"),
        ("[models]\nname = 'a'\n", "models", "non-empty array"),
        ("[[models]]\npath = 'a.gguf'\n", "models[0].name", "every model needs a name"),
        ("[[models]]\nname = 'a'\n", "models[0].path", "give path"),
        ("[[models]]\nname = 'a'\npath = 'a'\nladder = 'coder'\n", "models[0].path",
         "not both"),
        ("[[models]]\nname = 'a'\nladder = 'giant'\n", "models[0].ladder", "unknown ladder"),
        ("[[models]]\nname = 'a'\npath = 'a'\nseed = 1\n", "models[0].seed", "ladder models only"),
        ("[[models]]\nname = 'a'\npath = 'a'\nbackend = 'vllm'\n", "models[0].backend",
         "unknown backend"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = 'code'\n", "models[0].kinds",
         "array of kinds"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = ['code', 'poetry']\n", "models[0].kinds",
         "unknown kind 'poetry'"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = ['auto']\n", "models[0].kinds",
         "not one a model serves"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = []\n", "models[0].kinds",
         "at least one kind"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = ['code']\npreferred = ['embed']\n",
         "models[0].preferred", "not served"),
        ("[[models]]\nname = 'a'\npath = 'a'\nreplicas = 0\n", "models[0].replicas",
         "between 1 and 64"),
        ("[[models]]\nname = 'a'\npath = 'a'\nreplicas = 65\n", "models[0].replicas",
         "between 1 and 64"),
        ("[[models]]\nname = 'a'\npath = 'a'\nn_gpu_layers = -2\n", "models[0].n_gpu_layers",
         "between -1 and 10000"),
        ("[[models]]\nname = 'a'\npath = 'a'\nn_ctx = 4294967552\n", "models[0].n_ctx",
         "between 16 and 16777216, got 4294967552"),
        ("[[models]]\nname = 'a'\npath = 'a'\nn_threads = " + "9" * 400 + "\n",
         "models[0].n_threads", "between 1 and 1024, got an integer of 1329 bits"),
        ("[[models]]\nname = 'a'\npath = 'a'\nquality = 1001\n", "models[0].quality",
         "between 0 and 1000"),
        ("[[models]]\nname = 'a'\npath = 'a'\ndevice = -1\n", "models[0].device",
         "between 0 and 1024"),
        ("[[models]]\nname = 'a'\npath = 'a'\ndevice = true\n", "models[0].device",
         "got a boolean"),
        ("[[models]]\nname = 'a'\npath = 'a'\nn_ctx = inf\n", "models[0].n_ctx",
         "got a float"),
        ("[[models]]\nname = ''\npath = 'a'\n", "models[0].name", "non-empty printable"),
        ('[[models]]\nname = "a\\tb"\npath = "a"\n', "models[0].name", "printable"),
        ("[[models]]\nname = 3\npath = 'a'\n", "models[0].name", "got an integer"),
        ("[[models]]\nname = 'a'\npath = ''\n", "models[0].path", "non-empty file path"),
        ('[[models]]\nname = "a"\npath = "a\\u0000b"\n', "models[0].path", "NUL"),
        ("[[models]]\nname = 'a'\npath = 1\n", "models[0].path", "got an integer"),
        ("[[models]]\nname = 'a'\npath = 'a'\nbackend = 5\n", "models[0].backend",
         "backend name"),
        ("[[models]]\nname = 'a'\npath = 'a'\npreferred = true\n", "models[0].preferred",
         "array of kinds"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = { code = 1 }\n", "models[0].kinds",
         "array of kinds"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = [1]\n", "models[0].kinds",
         "unknown kind 1"),
        ("[[models]]\nname = 'a'\nladder = 'coder'\nseed = -1\n", "models[0].seed",
         "between 0 and 4294967295"),
        ("[[models]]\nname = 'a'\nladder = 'coder'\nn_ctx = 2\n", "models[0].n_ctx",
         "between 16"),
        ("[[models]]\nname = 'a'\nladder = 7\n", "models[0].ladder", "non-empty string"),
        ("[[models]]\nname = 'a'\npath = 'a'\nn_ctx = 1.5\n", "models[0].n_ctx", "got a float"),
        ("[[models]]\nname = 'a'\npath = 'a'\noptions = 3\n", "models[0].options",
         "must be a table"),
        ("[[models]]\nname = 'a'\npath = 'a'\noptional = 'yes'\n", "models[0].optional",
         "true or false"),
        ("[[models]]\nname = 'a'\npath = 'a'\n[[models]]\nname = 'a'\npath = 'b'\n",
         "models[1].name", "duplicate model name 'a' (also models[0])"),
        ("[[models]]\nname = 'a'\npath = 'a'\nkinds = ['code', 'simple', 'reason']\n", "models",
         "no model serves kind 'embed'"),
        ("[scheduler]\nkinds = ['code']\n[[models]]\nname = 'a'\npath = 'a'\nkinds = ['code']\n"
         "optional = true\n", "models", "every model that serves kind 'code' is optional"),
    ],
)  # fmt: skip
def test_invalid_config_names_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), make_models=False)
    assert info.value.key == key
    assert problem in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]\nname = 'a'\n")
    with pytest.raises(ConfigError, match=r"invalid TOML.*line 1"):
        load_config(bad)
    bad.write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    # TOML itself refuses a key given twice; the message still says where.
    bad.write_text("[scheduler]\nmailbox_capacity = 1\nmailbox_capacity = 2\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("x = " + "[" * 10_000 + "]" * 10_000 + "\n", "nested too deeply"),
        ("x = " + "{a = " * 2_000 + "1" + "}" * 2_000 + "\n", "nested too deeply"),
        ("x = " + "1" * 5_000 + "\n", "invalid TOML"),  # too long for Python's int()
    ],
)
def test_hostile_toml_is_a_config_error(tmp_path: Path, text: str, problem: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(bad)


def test_an_oversized_file_is_refused_unparsed(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text(MINIMAL + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)


# -- zeta config check agrees with Scheduler.from_config -------------------------------------------
#
# Documents are generated as plain mappings and written as TOML by hand (only scalars, arrays of
# scalars and inline tables of scalars occur). Each value is drawn from valid values, values just
# outside the documented range, and hostile ones (huge integers, non-finite floats, wrong types).

_HOSTILE: list[object] = [
    True, "1", "", 1.5, float("nan"), float("inf"), float("-inf"), 1e400, 10**400, -(10**400),
    2**32 + 256, -1, 0, ["simple"], {"a": 1},
]  # fmt: skip
_NAMES = ["a", "b", "coder", "", " ", "x" * 128, "x" * 129, "tab\there", "é"]
_KIND_NAMES = ["simple", "code", "embed", "reason", "auto", "poetry"]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string with ASCII escapes is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise AssertionError(value)


def _toml(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, table in doc.items():
        if section == "models":
            for entry in table:
                lines.append("[[models]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@st.composite
def _int_in(draw: st.DrawFn, low: int, high: int, hostile: bool) -> object:
    """A valid integer; or, if ``hostile``, maybe one just out of range or a hostile value."""
    valid = st.integers(low, min(high, low + 8)) | st.just(high)
    if not hostile:
        return draw(valid)
    return draw(valid | st.sampled_from([low - 1, high + 1]) | st.sampled_from(_HOSTILE))


@st.composite
def _number(draw: st.DrawFn, low: float, high: float, hostile: bool) -> object:
    valid = st.floats(low, high, allow_nan=False)
    if not hostile:
        return draw(valid)
    return draw(valid | st.sampled_from([-0.5, high + 1]) | st.sampled_from(_HOSTILE))


def _maybe(
    draw: st.DrawFn, table: dict[str, Any], key: str, values: st.SearchStrategy[object]
) -> None:
    if draw(st.booleans()):
        table[key] = draw(values)


@st.composite
def _config_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A config document; about half are valid (nothing hostile drawn), the rest are not
    necessarily invalid: each value may or may not be drawn from the hostile ones."""
    hostile = draw(st.booleans())
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["scheduler"] = {}
        _maybe(draw, doc["scheduler"], "mailbox_capacity", _int_in(1, 1 << 20, hostile))
        _maybe(draw, doc["scheduler"], "kinds", st.lists(st.sampled_from(_KIND_NAMES[:3])))
    if draw(st.booleans()):
        names = ["dynamic", "static", "threshold", "round_robin"] + ["fastest"] * hostile
        name = draw(st.sampled_from(names))
        doc["policy"] = {"name": name}
        if name == "threshold" and draw(st.booleans()):
            params: dict[str, Any] = {}
            _maybe(draw, params, "high", _number(0.9, 1.0, hostile))
            _maybe(draw, params, "low", _number(0.0, 0.5, hostile))
            _maybe(draw, params, "backlog_s", _number(0.1, 10.0, hostile))
            doc["policy"]["params"] = params
        elif hostile and draw(st.booleans()):
            doc["policy"]["params"] = {"tau": 1.0}  # belongs in [scoring]
    if draw(st.booleans()):
        doc["scoring"] = {}
        _maybe(draw, doc["scoring"], "tau", _number(1e-3, 1e6, hostile))
        for key in ("contention_weight", "spill_penalty", "quality_penalty", "harm_weight"):
            _maybe(draw, doc["scoring"], key, _number(0.0, 1e6, hostile))
        _maybe(draw, doc["scoring"], "co_slow", _number(0.0, 10.0, hostile))
    if draw(st.booleans()):
        doc["metrics"] = {}
        _maybe(draw, doc["metrics"], "enabled", st.booleans())
        _maybe(draw, doc["metrics"], "port", _int_in(0, 65535, hostile))
    models = []
    for i in range(draw(st.integers(1, 3))):
        entry: dict[str, Any] = {"name": draw(st.sampled_from(_NAMES)) if hostile else f"m{i}"}
        entry["backend"] = (
            draw(st.sampled_from(["simulated", "vllm", 5])) if hostile else "simulated"
        )
        _maybe(draw, entry, "path", st.sampled_from(["m.gguf", "", 1] if hostile else ["m.gguf"]))
        if i == 0 and not hostile:
            entry["kinds"] = _KIND_NAMES[:4]  # some model serves every kind
        else:
            kinds = _KIND_NAMES if hostile else _KIND_NAMES[:4]
            _maybe(draw, entry, "kinds", st.lists(st.sampled_from(kinds), min_size=1, max_size=4))
        if hostile:
            _maybe(draw, entry, "preferred", st.lists(st.sampled_from(_KIND_NAMES), max_size=2))
        _maybe(draw, entry, "quality", _int_in(0, 1000, hostile))
        _maybe(draw, entry, "replicas", _int_in(1, 64, hostile))
        _maybe(draw, entry, "n_ctx", _int_in(16, 2**24, hostile))
        _maybe(draw, entry, "n_threads", _int_in(1, 1024, hostile))
        _maybe(draw, entry, "n_gpu_layers", _int_in(-1, 10_000, hostile))
        _maybe(draw, entry, "device", _int_in(0, 1024, hostile))
        if i > 0 or hostile:
            _maybe(draw, entry, "optional", st.sampled_from([True, False] + ["yes"] * hostile))
        _maybe(draw, entry, "options", st.sampled_from([{"per_token_s": 0.01}, {}] + [3] * hostile))
        if hostile:
            _maybe(draw, entry, "ladder", st.just("giant"))  # never generates a file
        models.append(entry)
    doc["models"] = models
    return doc


def _error_key(build: Callable[[], object]) -> str | None:
    """``None`` if ``build()`` succeeds, else the key its ConfigError names (anything else
    escapes and fails the test)."""
    try:
        build()
    except ConfigError as exc:
        return exc.key or "(file)"
    return None


@settings(max_examples=300, deadline=None)
@given(doc=_config_documents())
def test_config_check_passes_exactly_when_the_scheduler_constructs(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zeta.toml"
        path.write_text(_toml(doc))
        checked = _error_key(lambda: load_config(path, make_models=False))  # zeta config check
        built = _error_key(lambda: Scheduler.from_config(path))  # constructed, never started
    event("accepted" if checked is None else "rejected")
    assert checked == built


# --- the [serve] table (zeta serve) ---------------------------------------------------------

ONE_SIMULATED = '[[models]]\nname = "m"\nbackend = "simulated"\n'


def _serve_config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "zeta.toml"
    path.write_text(textwrap.dedent(text) + ONE_SIMULATED)
    return load_config(path)


def test_serve_table_defaults_and_values(tmp_path: Path) -> None:
    assert _serve_config(tmp_path, "").serve == ServeConfig()
    assert ServeConfig() == ServeConfig(host="127.0.0.1", port=8000, max_body_bytes=4 << 20)
    config = _serve_config(
        tmp_path,
        """
        [serve]
        host = "::1"
        port = 0
        api_key_env = "MY_KEY"
        max_body_bytes = 2048
        max_tokens = 64
        """,
    )
    assert config.serve == ServeConfig("::1", 0, None, "MY_KEY", 2048, 64)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ("port = 70000", "serve.port", "between 0 and 65535"),
        ("port = '80'", "serve.port", "must be an integer"),
        ("host = ''", "serve.host", "non-empty string"),
        ("prot = 80", "serve.prot", "did you mean 'port'"),
        ("max_body_bytes = 10", "serve.max_body_bytes", "between 1024"),
        ("max_tokens = 0", "serve.max_tokens", "between 1"),
        ("api_key = 'a b'", "serve.api_key", "without spaces"),
        ("api_key = 5", "serve.api_key", "non-empty string"),
        ("api_key_env = 'not a name'", "serve.api_key_env", "environment variable"),
        ("api_key = 'k'\napi_key_env = 'K'", "serve.api_key", "not both"),
    ],
)
def test_serve_table_errors_name_the_key(table: str, key: str, message: str) -> None:
    doc = {"serve": {}, "models": [{"name": "m", "backend": "simulated"}]}
    doc["serve"] = tomllib.loads(table)
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert info.value.key == key
    assert message in info.value.message


def test_serve_table_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match="must be a table") as info:
        parse_config({"serve": 3, "models": [{"name": "m", "backend": "simulated"}]})
    assert info.value.key == "serve"


def test_api_key_comes_from_the_file_or_the_environment() -> None:
    assert ServeConfig().resolve_api_key({}) is None
    assert ServeConfig().resolve_api_key({"ZETA_API_KEY": ""}) is None
    assert ServeConfig().resolve_api_key({"ZETA_API_KEY": "k1"}) == "k1"
    assert ServeConfig(api_key_env="OTHER").resolve_api_key({"OTHER": "k2"}) == "k2"
    assert ServeConfig(api_key="k3").resolve_api_key({"ZETA_API_KEY": "k1"}) == "k3"
    with pytest.raises(ConfigError) as info:
        ServeConfig().resolve_api_key({"ZETA_API_KEY": "sk secret\n"})
    assert info.value.key == "ZETA_API_KEY" and "secret" not in str(info.value)
    assert "k3" not in repr(ServeConfig(api_key="k3"))


def test_example_config_serves_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZETA_CACHE_DIR", str(tmp_path))
    serve = load_config(EXAMPLE, make_models=False).serve
    assert serve == ServeConfig(host="127.0.0.1", port=8000, api_key_env="ZETA_API_KEY")
