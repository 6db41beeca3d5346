"""The generated model ladder: vocabulary, determinism, cache location, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from zeta import ConfigError, Kind, _ladder
from zeta.testing import (
    LADDER,
    LADDER_VERSION,
    ROLES,
    LadderModel,
    cache_dir,
    ladder_spec,
    make_ladder,
    make_model,
    model_path,
    write_model,
)


def test_vocab_is_spm_byte_fallback_with_prefix_closed_pieces() -> None:
    tokens, scores, types = _ladder.build_vocab()
    assert len(tokens) == len(scores) == len(types) == len(set(tokens))
    assert tokens[:5] == ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    assert set(types[1:5]) == {gguf.TokenType.CONTROL}
    assert tokens[5:261] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[5:261]) == {gguf.TokenType.BYTE}
    normal = {t for t, ty in zip(tokens, types, strict=True) if ty == gguf.TokenType.NORMAL}
    assert "▁" in normal and "a" in normal and "▁def" in normal
    for piece in normal:
        for i in range(1, len(piece)):
            assert piece[:i] in normal, f"prefix {piece[:i]!r} of {piece!r} missing"


def test_ladder_roles_step_up_in_size() -> None:
    embedder, coder, reasoner = (LADDER[n].n_params for n in ("embedder", "coder", "reasoner"))
    assert 2 <= coder / embedder <= 6
    assert 3 <= reasoner / coder <= 6
    for m in LADDER.values():
        assert m.role in ROLES


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a.gguf", "coder-tiny", seed=7)
    b = write_model(tmp_path / "b.gguf", "coder-tiny", seed=7)
    c = write_model(tmp_path / "c.gguf", "coder-tiny", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_file_metadata_and_zeroed_output_rows(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", "embedder-tiny")
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["llama.pooling_type"].contents() == gguf.PoolingType.MEAN
    output = next(t for t in reader.tensors if t.name == "output.weight")
    rows = np.asarray(output.data)
    _, _, types = _ladder.build_vocab()
    normal = np.array(types) == gguf.TokenType.NORMAL
    assert not rows[~normal].any()  # control, unknown and byte tokens can never win
    assert (np.abs(rows[normal]).sum(axis=1) > 0).all()


def test_cache_dir_honours_override_then_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZETA_CACHE_DIR", str(tmp_path / "override"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "override"
    monkeypatch.delenv("ZETA_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "zeta" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "zeta" / "models"
    monkeypatch.setenv("ZETA_CACHE_DIR", str(tmp_path))
    assert model_path("coder", seed=3) == tmp_path / f"coder-s3-v{LADDER_VERSION}.gguf"


def test_make_model_reuses_cache_and_force_rewrites(tmp_path: Path) -> None:
    path = make_model("embedder-tiny", directory=tmp_path)
    inode = path.stat().st_ino
    assert make_model("embedder-tiny", directory=tmp_path).stat().st_ino == inode
    assert make_model("embedder-tiny", directory=tmp_path, force=True).stat().st_ino != inode
    # A file that is not a GGUF (a stray, damaged copy) is replaced, not trusted.
    path.write_bytes(b"junk")
    assert make_model("embedder-tiny", directory=tmp_path).read_bytes()[:4] == b"GGUF"


def test_custom_models_sharing_a_name_never_share_a_cached_file(tmp_path: Path) -> None:
    narrow = LadderModel("mine", "coder", n_embd=32, n_layer=1, n_head=2, n_ff=64)
    wide = LadderModel("mine", "coder", n_embd=64, n_layer=1, n_head=2, n_ff=64)
    a, b = make_model(narrow, directory=tmp_path), make_model(wide, directory=tmp_path)
    assert a != b
    width = gguf.GGUFReader(b).fields["llama.embedding_length"].contents()
    assert width == 64  # not the 32-wide file cached first under the same name
    assert make_model(narrow, directory=tmp_path) == a  # and each is still reused
    # The ladder's own rungs keep their plain names, even when passed as objects.
    assert (
        model_path(LADDER["coder"], directory=tmp_path).name == f"coder-s0-v{LADDER_VERSION}.gguf"
    )


def test_interrupted_write_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(path: str, m: LadderModel, seed: int) -> None:
        Path(path).write_bytes(b"GGUF" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(_ladder, "_write_gguf", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_model("coder-tiny", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_make_ladder_defaults_to_the_three_roles(tmp_path: Path) -> None:
    small = LadderModel("coder-mini", "coder", n_embd=32, n_layer=1, n_head=2, n_ff=64)
    name = make_model(small, directory=tmp_path).name
    assert name.startswith("coder-mini-") and name.endswith(f"-s0-v{LADDER_VERSION}.gguf")
    paths = make_ladder(["embedder-tiny", "reasoner-tiny"], directory=tmp_path, seed=1)
    assert sorted(paths) == ["embedder-tiny", "reasoner-tiny"]
    assert all(p.is_file() and p.parent == tmp_path for p in paths.values())
    assert sorted(n for n in LADDER if not n.endswith("-tiny")) == ["coder", "embedder", "reasoner"]


def test_ladder_spec_takes_role_defaults_and_overrides(tmp_path: Path) -> None:
    spec = ladder_spec("coder-tiny", directory=tmp_path, n_threads=2, name="c")
    assert spec.name == "c" and spec.n_threads == 2
    assert Kind.CODE in spec.preferred and Kind.REASON in spec.kinds
    assert spec.path is not None and os.path.isfile(spec.path)
    emb = ladder_spec("embedder-tiny", directory=tmp_path)
    assert emb.kinds == frozenset({Kind.EMBED})
    narrowed = ladder_spec("coder-tiny", directory=tmp_path, kinds=[Kind.CODE, Kind.REASON])
    assert narrowed.preferred == frozenset({Kind.CODE})


def test_bad_ladder_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown ladder model 'nope'"):
        make_model("nope")
    with pytest.raises(ConfigError, match="role"):
        LadderModel("x", "painter", n_embd=64, n_layer=1, n_head=2, n_ff=64)
    with pytest.raises(ConfigError, match="n_head"):
        LadderModel("x", "coder", n_embd=64, n_layer=1, n_head=3, n_ff=64)


@pytest.mark.parametrize("field", ["n_embd", "n_layer", "n_head", "n_ff", "n_ctx_train"])
def test_ladder_model_shape_must_be_positive(field: str) -> None:
    shape = {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_ff": 128, field: 0}
    with pytest.raises(ConfigError, match=field):
        LadderModel("bad", "coder", **shape)
