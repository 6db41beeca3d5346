"""A ladder of generated random-weight llama models, so zeta runs without downloading anything.

Each rung is a llama-architecture GGUF file that llama.cpp loads like any real model: a
SentencePiece-style byte-fallback vocabulary, random weights from a seed, and mean pooling so the
same file also serves embeddings. The weights are random, so the text is gibberish, but the cost
of a token is real: the three roles (embedder, coder, reasoner) are sized so their per-token
latency is about 4x apart, which is what zeta's routing cares about. Tiny rungs keep tests fast.

Two properties make the files convenient to schedule onto:

* The output-projection rows of control, byte and unused tokens are zero while every normal
  token's logit has a spread of several units, so neither greedy nor the usual top-k/min-p
  sampling ever picks end-of-sequence or a lone byte: generation runs exactly to ``max_tokens``
  and every token decodes to whole characters.
* Files are deterministic for a seed and written atomically (temporary file, then rename), so
  concurrent or interrupted runs never leave a half-written model in the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from ._chat import CHATML_TEMPLATE
from ._exceptions import ConfigError
from ._types import Kind, ModelSpec

__all__ = [
    "LADDER",
    "LADDER_VERSION",
    "LadderModel",
    "ROLES",
    "build_vocab",
    "cache_dir",
    "ladder_spec",
    "make_ladder",
    "make_model",
    "model_path",
    "write_model",
]

#: Bumped whenever the vocabulary, layout or weight recipe changes; part of every file name, so
#: a new version never reads a stale cached file.
LADDER_VERSION = 2

#: Environment variable that overrides where generated models are cached.
CACHE_ENV = "ZETA_CACHE_DIR"


@dataclass(frozen=True, slots=True)
class LadderModel:
    """The shape of one generated model.

    Args:
        name: ladder name, also the stem of the cached file.
        role: ``"embedder"``, ``"coder"`` or ``"reasoner"``; picks the kinds it serves.
        n_embd: hidden width.
        n_layer: number of transformer blocks.
        n_head: attention heads (``n_embd`` must divide evenly).
        n_ff: feed-forward width.
        n_ctx_train: context length recorded in the file.
        f16: store the 2-D weights as float16 (half the bytes per token read); norms stay f32.
        byte_output: let the model generate byte tokens too, so completions contain characters
            split across tokens and invalid UTF-8; for testing decoders. Off for the ladder.
        chat_template: the ``tokenizer.chat_template`` written to the file (ChatML by default;
            ``None`` writes none), for tests of templates that misbehave.
    """

    name: str
    role: str
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx_train: int = 4096
    f16: bool = False
    byte_output: bool = False
    chat_template: str | None = CHATML_TEMPLATE

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"unknown role {self.role!r}; expected one of {sorted(ROLES)}")
        for key in ("n_embd", "n_layer", "n_head", "n_ff", "n_ctx_train"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be an integer >= 1, got {value!r}", key=key)
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError("n_embd / n_head must be an even integer (RoPE pairs)")

    @property
    def n_params(self) -> int:
        """Parameter count, embeddings and output projection included."""
        d, ff = self.n_embd, self.n_ff
        per_layer = 4 * d * d + 3 * d * ff + 2 * d
        return 2 * VOCAB_SIZE * d + self.n_layer * per_layer + d


#: What each role serves by default: ``(kinds, preferred, quality)``. The coder and reasoner can
#: each serve the other's kinds, at a spill penalty, which is what lets a dynamic policy move a
#: surge of code requests to an idle reasoner.
ROLES: dict[str, tuple[frozenset[Kind], frozenset[Kind], int]] = {
    "embedder": (frozenset({Kind.EMBED}), frozenset({Kind.EMBED}), 0),
    "coder": (
        frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON}),
        frozenset({Kind.SIMPLE, Kind.CODE}),
        1,
    ),
    "reasoner": (
        frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON}),
        frozenset({Kind.REASON}),
        0,
    ),
}

# Word list for the vocabulary: a mix of English, code and reasoning words so prompts written in
# any of those styles tokenize into a realistic number of pieces (about 3-4 characters each).
_WORDS = """
the of and to in is it that for on with as was be by at or this are from but not have an they
which you one were all we when there can has more if will no out so said what up its about into
than them only other new some could time these two may then do first any my now such like our
over man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know
while last might us great old year off come since against go came right used take three answer
question reason think step therefore hence thus proof assume given suppose show result case
true false none null self def return import class function async await yield lambda pass raise
try except finally with assert print range len list dict set tuple str int float bool bytes
value values key keys item items data model request response error type name path file open read
write close args kwargs init main test tests config model models token tokens prompt output
input const let var fn pub struct impl enum match use mod loop break continue else elif while
for from public private static void string number object array map filter reduce sum max min
sort sorted append extend insert remove pop index count format join split strip replace
""".split()

# Pieces that appear in code: operators, brackets and indentation (``▁`` is SentencePiece's space).
_CODE_PIECES = (
    "()", "():", "(self", "self.", "->", "=>", "==", "!=", "<=", ">=", "+=", "-=", "**", "//",
    "::", "{}", "[]", "[0]", "__", "__init__", "\"\"\"", "''", "0x", "00", "10", "100",
    "▁▁", "▁▁▁▁", "▁▁▁▁▁▁▁▁", "▁=", "▁+", "▁-", "▁*", "▁/", "▁(", "▁{", "▁[", "▁#", "▁//",
)  # fmt: skip

#: Special tokens: SentencePiece's three, then ChatML's turn markers, which the ladder's chat
#: template (:data:`zeta._chat.CHATML_TEMPLATE`) writes and llama.cpp reads as control tokens
#: (``<|im_end|>`` ends generation).
_SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3, 4


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """The ladder's SentencePiece-style vocabulary: ``(tokens, scores, token_types)``.

    Layout: ``<unk>``, ``<s>``, ``</s>``, ``<|im_start|>``, ``<|im_end|>``, the 256 byte tokens ``<0x00>``..``<0xFF>`` (so any text
    tokenizes, byte by byte where no piece matches), then normal pieces: printable ASCII, ``▁``,
    and words with and without a leading ``▁``. Every prefix of a multi-character piece is a
    piece too, because llama.cpp's SPM tokenizer builds pieces by merging adjacent symbols and
    can only reach a piece whose prefixes exist. Longer pieces score higher, so they win merges.
    """
    tokens: list[str] = list(_SPECIALS)
    types: list[int] = [gguf.TokenType.UNKNOWN]
    types += [gguf.TokenType.CONTROL] * (len(_SPECIALS) - 1)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = {chr(c) for c in range(0x21, 0x7F)} | {"▁"}
    for word in (*_WORDS, *_CODE_PIECES):
        for variant in (word, word if word.startswith("▁") else "▁" + word):
            pieces.update(variant[:i] for i in range(1, len(variant) + 1))
    normal = sorted(pieces, key=lambda p: (len(p), p))
    tokens += normal
    types += [gguf.TokenType.NORMAL] * len(normal)
    scores = [0.0] * (len(_SPECIALS) + 256) + [float(len(p)) for p in normal]
    return tokens, scores, [int(t) for t in types]


VOCAB_SIZE = len(build_vocab()[0])


#: The ladder. ``*-tiny`` rungs are for tests (a few MB, load in milliseconds). The three role
#: rungs are for the demo and benchmarks: about 6.5M, 18M and 81M parameters (26, 72 and 323 MB
#: as f32), which ran at 0.8, 3.2 and 14 ms per token on one thread of a 2-core EPYC VM, so
#: about 4x per rung. (Parameter counts step less than 4x at the bottom: the embedder fits in
#: the L3 cache, which makes it faster per parameter.)
LADDER: dict[str, LadderModel] = {
    m.name: m
    for m in (
        LadderModel("embedder-tiny", "embedder", n_embd=64, n_layer=2, n_head=2, n_ff=176),
        LadderModel("coder-tiny", "coder", n_embd=128, n_layer=2, n_head=4, n_ff=352),
        LadderModel("reasoner-tiny", "reasoner", n_embd=192, n_layer=2, n_head=4, n_ff=512),
        LadderModel("embedder", "embedder", n_embd=256, n_layer=7, n_head=4, n_ff=704),
        LadderModel("coder", "coder", n_embd=512, n_layer=5, n_head=8, n_ff=1408),
        LadderModel("reasoner", "reasoner", n_embd=1024, n_layer=6, n_head=16, n_ff=2816),
    )
}


def cache_dir() -> Path:
    """Where generated models live: ``$ZETA_CACHE_DIR``, else ``$XDG_CACHE_HOME/zeta/models``,
    else ``~/.cache/zeta/models``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base).expanduser() / "zeta" / "models"


def _resolve(model: str | LadderModel) -> LadderModel:
    if isinstance(model, LadderModel):
        return model
    try:
        return LADDER[model]
    except KeyError:
        raise ConfigError(f"unknown ladder model {model!r}; known: {sorted(LADDER)}") from None


def model_path(
    model: str | LadderModel, *, seed: int = 0, directory: str | os.PathLike[str] | None = None
) -> Path:
    """The cache path of a ladder model for ``seed`` (whether or not it exists yet).

    A custom :class:`LadderModel` (not the :data:`LADDER` entry of its name) gets a digest of its
    shape in the name too, so two shapes under one name never share a cached file.
    """
    m = _resolve(model)
    stem = m.name
    if LADDER.get(m.name) != m:
        digest = hashlib.sha256(repr(dataclasses.astuple(m)).encode()).hexdigest()[:10]
        stem = f"{m.name}-{digest}"
    return (
        Path(directory) if directory else cache_dir()
    ) / f"{stem}-s{seed}-v{LADDER_VERSION}.gguf"


def make_model(
    model: str | LadderModel,
    *,
    seed: int = 0,
    directory: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Return the path of ladder model ``model``, generating it first if it is not cached.

    Args:
        model: a name from :data:`LADDER` or a custom :class:`LadderModel`.
        seed: weight seed; the same seed always gives byte-identical files.
        directory: cache directory; defaults to :func:`cache_dir`.
        force: regenerate even if the file exists.
    """
    m = _resolve(model)
    path = model_path(m, seed=seed, directory=directory)
    if force or not _looks_complete(path):
        write_model(path, m, seed=seed)
    return path


def make_ladder(
    names: Iterable[str] | None = None,
    *,
    seed: int = 0,
    directory: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Generate (or find cached) every named model; all non-tiny rungs by default."""
    chosen = list(names) if names is not None else [n for n in LADDER if not n.endswith("-tiny")]
    return {n: make_model(n, seed=seed, directory=directory) for n in chosen}


def ladder_spec(
    model: str | LadderModel,
    *,
    name: str | None = None,
    seed: int = 0,
    directory: str | os.PathLike[str] | None = None,
    **overrides: object,
) -> ModelSpec:
    """A :class:`~zeta.ModelSpec` for a ladder model, generating the file if needed.

    Kinds, preferred kinds and quality come from the model's role (:data:`ROLES`); ``overrides``
    replace any :class:`~zeta.ModelSpec` field (``n_threads``, ``replicas``, ``kinds``, ...).
    Given ``kinds`` but no ``preferred``, the role's preferred kinds are narrowed to ``kinds``.
    """
    m = _resolve(model)
    kinds, preferred, quality = ROLES[m.role]
    fields: dict[str, object] = {
        "name": name or m.name,
        "path": str(make_model(m, seed=seed, directory=directory)),
        "kinds": kinds,
        "preferred": preferred,
        "quality": quality,
        "n_ctx": 512,
    }
    kinds_override = overrides.get("kinds")
    if isinstance(kinds_override, Iterable) and "preferred" not in overrides:
        # The role's preferred kinds, narrowed to what this spec serves (empty: all of them).
        # An invalid kind is left for ModelSpec to report as a ConfigError.
        with contextlib.suppress(ValueError):
            fields["preferred"] = preferred & {Kind(k) for k in kinds_override}
    fields.update(overrides)
    return ModelSpec(**fields)  # type: ignore[arg-type]


def _looks_complete(path: Path) -> bool:
    # Files appear only by atomic rename, so a GGUF magic at the start means a whole file.
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def write_model(path: str | os.PathLike[str], model: str | LadderModel, *, seed: int = 0) -> Path:
    """Write ladder model ``model`` to ``path`` atomically and return the path.

    The file is written next to its destination under a temporary name and renamed into place
    only when complete, so readers see either no file or a whole one, and a failed or interrupted
    write leaves nothing behind.
    """
    m = _resolve(model)
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        _write_gguf(tmp, m, seed)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
            digest = _sha256(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached models are not secrets
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _mark_trusted(digest, dest)
    return dest


#: SHA-256 digests of the model files this process wrote; see :func:`is_trusted`.
_written: set[str] = set()


def _sha256(f: BinaryIO) -> str:
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _trust_marker(digest: str) -> Path:
    return cache_dir() / "verified" / f"{digest}.trusted"


def is_trusted(digest: str) -> bool:
    """Whether the ladder wrote a file with SHA-256 ``digest``, in this process or (as recorded
    under :func:`cache_dir`) an earlier one. The llama.cpp backend loads such a file without
    first probing it in a throwaway process."""
    return digest in _written or _trust_marker(digest).exists()


def _mark_trusted(digest: str, path: Path) -> None:
    _written.add(digest)
    with contextlib.suppress(OSError):  # a read-only cache only costs one load probe later
        marker = _trust_marker(digest)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{path}\n")


def _tensor_plan(m: LadderModel) -> Iterator[tuple[str, tuple[int, ...], float | None]]:
    """``(name, numpy shape, init scale)`` per tensor in file order; ``None`` scale is a norm."""
    d, ff, v = m.n_embd, m.n_ff, VOCAB_SIZE
    yield "token_embd.weight", (v, d), 1.0
    for i in range(m.n_layer):
        blk = f"blk.{i}"
        yield f"{blk}.attn_norm.weight", (d,), None
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            yield f"{blk}.{proj}.weight", (d, d), d**-0.5
        yield f"{blk}.ffn_norm.weight", (d,), None
        yield f"{blk}.ffn_gate.weight", (ff, d), d**-0.5
        yield f"{blk}.ffn_up.weight", (ff, d), d**-0.5
        yield f"{blk}.ffn_down.weight", (d, ff), ff**-0.5
    yield "output_norm.weight", (d,), None
    # Normal tokens' logits get a standard deviation of about 4 (the final hidden state has unit
    # RMS), so the best one beats a zeroed row by far more than min-p or top-k would keep.
    yield "output.weight", (v, d), 4.0 * d**-0.5


def _write_gguf(path: str, m: LadderModel, seed: int) -> None:
    tokens, scores, types = build_vocab()
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"zeta-ladder-{m.name}")
    w.add_description(
        f"zeta generated random-weight model {m.name} (role {m.role}, seed {seed}, "
        f"ladder v{LADDER_VERSION}); produces gibberish at realistic per-token cost"
    )
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if m.f16 else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(m.n_ctx_train)
    w.add_embedding_length(m.n_embd)
    w.add_block_count(m.n_layer)
    w.add_feed_forward_length(m.n_ff)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head)
    w.add_rope_dimension_count(m.n_embd // m.n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_eot_token_id(IM_END_ID)
    if m.chat_template is not None:
        w.add_chat_template(m.chat_template)

    weight_dtype = np.dtype(np.float16 if m.f16 else np.float32)
    plan = list(_tensor_plan(m))
    for name, shape, scale in plan:
        dtype = np.dtype(np.float32) if scale is None else weight_dtype
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Generate tensor by tensor, in file order, from one stream: memory stays at one tensor and
    # the bytes depend only on the seed.
    rng = np.random.default_rng(seed)
    allowed = {gguf.TokenType.NORMAL} | ({gguf.TokenType.BYTE} if m.byte_output else set())
    silenced = np.array([t not in allowed for t in types])
    for name, shape, scale in plan:
        if scale is None:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        arr = rng.standard_normal(shape, dtype=np.float32)
        arr *= np.float32(scale)
        if name == "output.weight":
            arr[silenced] = 0.0
        w.write_tensor_data(arr.astype(weight_dtype, copy=False))
    w.close()
