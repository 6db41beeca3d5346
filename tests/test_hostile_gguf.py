"""Hostile GGUF files: each one is refused with ModelLoadError and the process lives on.

The corpus comes from ``tests/hostile_gguf.py`` (generated, not committed as binaries). Every file
goes through the real llama.cpp backend with its default options: the metadata check refuses
most in Python, and the load probe refuses the rest in a throwaway process. The files that abort
llama.cpp are also opened with the metadata check off, to show that the probe alone turns each
abort into a ModelLoadError naming the signal. Verdicts go to a fresh cache directory, so nothing
here is trusted or verified in advance.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_gguf import ABORTS, ACCEPTS, CASES, REFUSES, write_corpus

from zeta import Kind, ModelLoadError, ModelSpec
from zeta.backends import CompletionParams
from zeta.backends._gguf_check import check_gguf
from zeta.backends.llama_cpp import open_backend
from zeta.testing import LadderModel, make_model

ABORTING = sorted(name for name, case in CASES.items() if case.llama == ABORTS)

#: The files the issue found killing the process, by the name of the case that reproduces each.
FROM_THE_ISSUE = ("block-count-zero", "block-count-2-31", "tokens-duplicate", "token-invalid-utf8",
                  "tokens-all-empty", "pooling-type-99", "rms-epsilon-nan")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def verdict_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty verdict cache for this module: every file here is unverified at first."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("zeta-cache")
        mp.setenv("ZETA_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("hostile"))


def _spec(path: Path, **options: Any) -> ModelSpec:
    return ModelSpec(name="hostile", path=str(path), n_ctx=256, options=options)


def _no_subprocess(*args: object, **kwargs: object) -> Any:
    raise AssertionError("a verdict should have come from the cache, not a new probe")


def test_the_corpus() -> None:
    assert len(CASES) >= 64
    assert set(FROM_THE_ISSUE) <= set(CASES)
    assert {case.llama for case in CASES.values()} == {ABORTS, REFUSES, ACCEPTS}
    assert len(ABORTING) >= 10


def test_the_base_model_passes_the_probe_once(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus' files differ from a working model in one thing each; this is that model."""
    base = corpus["tensor-missing"].parent / "base.gguf"
    backend = open_backend(_spec(base), 0)  # unverified: probed in a child process
    try:
        assert (
            backend.complete(CompletionParams("hello world", max_tokens=4)).completion_tokens == 4
        )
        (vector,) = backend.embed(["hello world"]).vectors
        assert len(vector) == backend.n_embd
    finally:
        backend.close()
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    open_backend(_spec(base), 1).close()  # the verdict is cached by the file's hash


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_refused(name: str, corpus: dict[str, Path]) -> None:
    path = corpus[name]
    with pytest.raises(ModelLoadError) as info:
        open_backend(_spec(path), 0)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("name", ABORTING)
def test_the_probe_alone_survives_what_aborts_llama_cpp(
    name: str, corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = corpus[name]
    options = {"gguf_check": False}  # let llama.cpp see the file, in the probe process only
    with pytest.raises(ModelLoadError, match=r"crashed on this file \(SIGABRT in the load probe"):
        open_backend(_spec(path, **options), 0)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    with pytest.raises(ModelLoadError, match="crashed on this file") as info:
        open_backend(_spec(path, **options), 0)  # the crash verdict is cached
    assert info.value.path == str(path)


def test_crash_message_names_the_stage_and_the_assertion(corpus: dict[str, Path]) -> None:
    for name, stage, what in (("block-count-zero", "load", "llama-model.cpp:"),
                              ("pooling-type-99", "embed", "unknown pooling type"),
                              ("rms-epsilon-nan", "decode", "GGML_ASSERT(eps >= 0.0f)"),
                              ("tokens-all-empty", "tokenize", "out_of_range")):  # fmt: skip
        with pytest.raises(ModelLoadError) as info:
            open_backend(_spec(corpus[name], gguf_check=False), 0)
        message = str(info.value)
        assert f"SIGABRT in the load probe, at {stage}" in message and what in message
        assert "/vendor/" not in message  # build paths are cut to file names


def test_the_metadata_check_accepts_ladder_models(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    half = LadderModel("half-tiny", "coder", n_embd=64, n_layer=1, n_head=2, n_ff=128, f16=True)
    for path in [*tiny_models.values(), make_model(half, directory=tmp_path)]:
        info = check_gguf(path)
        assert info.metadata["general.architecture"].value == b"llama"


def test_ladder_models_are_trusted_without_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LadderModel("trusted-tiny", "embedder", n_embd=64, n_layer=1, n_head=2, n_ff=128)
    path = make_model(model, directory=tmp_path)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    spec = ModelSpec(name="t", path=str(path), n_ctx=256, kinds=frozenset({Kind.EMBED}))
    backend = open_backend(spec, 0)
    backend.close()


def test_probe_timeout_is_a_model_load_error_and_not_cached(corpus: dict[str, Path]) -> None:
    path = corpus["tensor-missing"]  # passes the metadata check, so only the probe can refuse it
    for _ in range(2):
        with pytest.raises(ModelLoadError, match=r"did not finish within 0.01s"):
            open_backend(_spec(path, probe_timeout_s=0.01), 0)
    with pytest.raises(ModelLoadError, match=r"'blk\.0\.ffn_up\.weight' not found"):
        open_backend(_spec(path), 0)  # the load error llama.cpp gave in the probe process


def _fake_python(tmp_path: Path, script: str) -> str:
    exe = tmp_path / "python"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_a_killed_probe_says_so_and_is_not_cached(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL is what the out-of-memory killer sends: not the file's fault, so not remembered."""
    path = corpus["tensor-shape-wrong"]
    calls: list[object] = []
    real_run = subprocess.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "kill -9 $$"))
    monkeypatch.setattr(subprocess, "run", counting_run)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match=r"SIGKILL in the load probe"):
            open_backend(_spec(path), 0)
    assert len(calls) == 2


def test_a_probe_that_cannot_run_is_a_model_load_error(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = corpus["tensor-shape-wrong"]
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "echo broken >&2; exit 1"))
    with pytest.raises(ModelLoadError, match=r"load probe failed \(exit status 1.*broken"):
        open_backend(_spec(path), 0)
    monkeypatch.setattr(sys, "executable", "")
    with pytest.raises(ModelLoadError, match="no Python interpreter"):
        open_backend(_spec(path), 0)


def test_probe_off_loads_in_process(corpus: dict[str, Path]) -> None:
    path = corpus["tensor-shape-wrong"]
    with pytest.raises(ModelLoadError, match=r"llama\.cpp could not load it.*wrong shape"):
        open_backend(_spec(path, probe=False), 0)
