"""A corpus of hostile GGUF files, generated rather than committed as binary blobs.

Every file is a tiny llama model (one block, width 32, the model ladder's SPM vocabulary) with one
thing wrong: a container field (counts, lengths, types, offsets, alignment, truncation), a
hyperparameter (block count, head counts, epsilons, pooling, experts), the vocabulary
(duplicate, empty or invalid-UTF-8 tokens, missing byte tokens, bad token types) or a tensor.
Files are written by a raw serializer of our own, since ``gguf.GGUFWriter`` refuses to write
most of these.

Each :class:`Case` says whether llama.cpp, given the file unguarded, kills the process
(``aborts``): that is what zeta's checks and load probe exist for. ``python -m tests.hostile_gguf
DIR`` writes the corpus to ``DIR``; ``--raw`` also loads each file unguarded in a child process
and reports how llama.cpp fares, which is how the ``aborts`` flags were established.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zeta._ladder import build_vocab

# GGUF value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FORMAT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<B", U64: "<Q", I64: "<q", F64: "<d"}  # fmt: skip
_NP = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4", F32: "<f4",
       BOOL: "<u1", U64: "<u8", I64: "<i8", F64: "<f8"}  # fmt: skip
GGML_F32, GGML_Q4_K = 0, 12

N_EMBD, N_HEAD, N_FF, N_LAYER = 32, 2, 64, 1


@dataclass
class Raw:
    """Bytes written verbatim in place of a key or of a value (after its type)."""

    data: bytes


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: row length first
    type: int
    data: bytes
    offset: int | None = None  # None: packed in order, as a writer would


@dataclass
class Recipe:
    """A GGUF file as a list of metadata entries and tensors, each freely editable."""

    kv: list[tuple[str | bytes | Raw, int, Any]]
    tensors: list[Tensor]
    version: int = 3
    alignment: int = 32
    n_kv: int | None = None  # header counts; None: the true ones
    n_tensors: int | None = None

    def get(self, key: str) -> Any:
        return next(v for k, _, v in self.kv if k == key)

    def set(self, key: str, vtype: int, value: Any) -> None:
        for i, (k, _, _) in enumerate(self.kv):
            if k == key:
                self.kv[i] = (key, vtype, value)
                return
        self.kv.append((key, vtype, value))

    def drop(self, key: str) -> None:
        self.kv = [e for e in self.kv if e[0] != key]

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype == STR:
        return _string(value)
    if vtype == ARR:
        etype, items = value
        head = struct.pack("<IQ", etype, len(items))
        if etype == STR:
            return head + b"".join(_string(s) for s in items)
        return head + np.asarray(items, dtype=_NP[etype]).tobytes()
    return struct.pack(_FORMAT[vtype], value)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def encode(r: Recipe) -> bytes:
    """The bytes of the GGUF file ``r`` describes."""
    out = bytearray(b"GGUF")
    n_kv = len(r.kv) if r.n_kv is None else r.n_kv
    n_tensors = len(r.tensors) if r.n_tensors is None else r.n_tensors
    out += struct.pack("<IQQ", r.version, n_tensors, n_kv)
    for key, vtype, value in r.kv:
        out += key.data if isinstance(key, Raw) else _string(key)
        out += struct.pack("<I", vtype) + _value(vtype, value)
    offsets, at = [], 0
    for t in r.tensors:
        offsets.append(at if t.offset is None else t.offset)
        at = _pad(at + len(t.data), r.alignment)
    for t, offset in zip(r.tensors, offsets, strict=True):
        out += _string(t.name) + struct.pack("<I", len(t.shape))
        out += b"".join(struct.pack("<Q", d) for d in t.shape)
        out += struct.pack("<IQ", t.type, offset)
    out += bytes(_pad(len(out), r.alignment) - len(out))
    for t in r.tensors:
        out += t.data + bytes(_pad(len(t.data), r.alignment) - len(t.data))
    return bytes(out)


def _f32(rng: np.random.Generator, shape: tuple[int, ...], scale: float | None) -> bytes:
    numpy_shape = tuple(reversed(shape))
    if scale is None:
        return np.ones(numpy_shape, dtype=np.float32).tobytes()
    return (rng.standard_normal(numpy_shape, dtype=np.float32) * np.float32(scale)).tobytes()


def base_recipe() -> Recipe:
    """A small, valid llama model; every case changes one thing in it."""
    tokens, scores, types = build_vocab()
    v, d, ff = len(tokens), N_EMBD, N_FF
    kv: list[tuple[str | bytes | Raw, int, Any]] = [
        ("general.architecture", STR, "llama"),
        ("general.name", STR, "hostile-base"),
        ("llama.context_length", U32, 512),
        ("llama.embedding_length", U32, d),
        ("llama.block_count", U32, N_LAYER),
        ("llama.feed_forward_length", U32, ff),
        ("llama.attention.head_count", U32, N_HEAD),
        ("llama.attention.head_count_kv", U32, N_HEAD),
        ("llama.rope.dimension_count", U32, d // N_HEAD),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.pooling_type", U32, 1),
        ("tokenizer.ggml.model", STR, "llama"),
        ("tokenizer.ggml.tokens", ARR, (STR, list(tokens))),
        ("tokenizer.ggml.scores", ARR, (F32, scores)),
        ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.unknown_token_id", U32, 0),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.ggml.add_bos_token", BOOL, True),
        ("tokenizer.ggml.add_eos_token", BOOL, False),
    ]
    rng = np.random.default_rng(7)
    plan: list[tuple[str, tuple[int, ...], float | None]] = [("token_embd.weight", (d, v), 1.0)]
    for i in range(N_LAYER):
        plan += [
            (f"blk.{i}.attn_norm.weight", (d,), None),
            (f"blk.{i}.attn_q.weight", (d, d), d**-0.5),
            (f"blk.{i}.attn_k.weight", (d, d), d**-0.5),
            (f"blk.{i}.attn_v.weight", (d, d), d**-0.5),
            (f"blk.{i}.attn_output.weight", (d, d), d**-0.5),
            (f"blk.{i}.ffn_norm.weight", (d,), None),
            (f"blk.{i}.ffn_gate.weight", (d, ff), d**-0.5),
            (f"blk.{i}.ffn_up.weight", (d, ff), d**-0.5),
            (f"blk.{i}.ffn_down.weight", (ff, d), ff**-0.5),
        ]
    plan += [("output_norm.weight", (d,), None), ("output.weight", (d, v), d**-0.5)]
    tensors = [Tensor(n, s, GGML_F32, _f32(rng, s, scale)) for n, s, scale in plan]
    return Recipe(kv, tensors)


#: What llama.cpp (llama-cpp-python 0.3.36) does with a file when zeta does not guard it, as
#: ``python -m tests.hostile_gguf DIR --raw`` found: kills the process (``abort()``), refuses it
#: with an error, or accepts it and runs (a malformed file all the same: NaN or zero epsilons,
#: invalid UTF-8, impossible token types, an out-of-vocabulary special token).
ABORTS, REFUSES, ACCEPTS = "aborts", "refuses", "accepts"


@dataclass(frozen=True)
class Case:
    """One hostile file: how to make it from the base, and what llama.cpp alone does with it."""

    name: str
    make: Callable[[Recipe], Recipe | bytes]
    llama: str = REFUSES


def _kv(key: str, vtype: int, value: Any) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        r.set(key, vtype, value)
        return r

    return make


def _drop(key: str) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        r.drop(key)
        return r

    return make


def _edit(fn: Callable[[Recipe], object]) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        fn(r)
        return r

    return make


def _bytes(fn: Callable[[bytes], bytes]) -> Callable[[Recipe], bytes]:
    return lambda r: fn(encode(r))


def _tokens(fn: Callable[[list[Any]], object]) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        _, tokens = r.get("tokenizer.ggml.tokens")
        tokens = list(tokens)
        fn(tokens)
        r.set("tokenizer.ggml.tokens", ARR, (STR, tokens))
        return r

    return make


def _first_tensor_info_offset(r: Recipe) -> int:
    """Where the tensor infos start in ``encode(r)``."""
    full = encode(r)
    name = _string(r.tensors[0].name)
    return full.index(name, 24)


def _cut_in_tensor_infos(r: Recipe) -> bytes:
    start = _first_tensor_info_offset(r)
    return encode(r)[: start + 40]


def _swap_offsets(r: Recipe) -> Recipe:
    a, b = r.tensors[1], r.tensors[2]
    sizes = [_pad(len(t.data), r.alignment) for t in r.tensors]
    a.offset, b.offset = sizes[0] + sizes[1], sizes[0]
    return r


def _set_type(name: str, ggml_type: int) -> Callable[[Recipe], Recipe]:
    return _edit(lambda r: setattr(r.tensor(name), "type", ggml_type))


def _set_shape(name: str, shape: tuple[int, ...]) -> Callable[[Recipe], Recipe]:
    return _edit(lambda r: setattr(r.tensor(name), "shape", shape))


def _rename(old: str, new: str) -> Callable[[Recipe], Recipe]:
    return _edit(lambda r: setattr(r.tensor(old), "name", new))


def _add_token(r: Recipe) -> Recipe:
    """One more token than the embedding has rows."""
    for key, etype, extra in (("tokenizer.ggml.tokens", STR, "▁zzzextra"),
                              ("tokenizer.ggml.scores", F32, 0.0),
                              ("tokenizer.ggml.token_type", I32, 1)):  # fmt: skip
        _, items = r.get(key)
        r.set(key, ARR, (etype, [*items, extra]))
    return r


def _extra_block(r: Recipe) -> Recipe:
    r.tensors.append(Tensor("blk.1.attn_norm.weight", (N_EMBD,), GGML_F32, bytes(4 * N_EMBD)))
    return r


def _set_token_type(i: int, value: int) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        _, types = r.get("tokenizer.ggml.token_type")
        types = list(types)
        types[i] = value
        r.set("tokenizer.ggml.token_type", ARR, (I32, types))
        return r

    return make


def _shorten(key: str, etype: int) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        _, items = r.get(key)
        r.set(key, ARR, (etype, list(items)[:-10]))
        return r

    return make


def _replace_byte_token(r: Recipe) -> Recipe:
    _, tokens = r.get("tokenizer.ggml.tokens")
    tokens = [("<0x0A>x" if t == "<0x0A>" else t) for t in tokens]
    r.set("tokenizer.ggml.tokens", ARR, (STR, tokens))
    return _set_token_type(3 + 0x0A, 1)(r)


def _duplicate_key(r: Recipe) -> Recipe:
    r.kv.append(("general.architecture", STR, "llama"))
    return r


def _huge_array(key: str, etype: int, count: int) -> Callable[[Recipe], Recipe]:
    return _kv(key, ARR, Raw(struct.pack("<IQ", etype, count) + struct.pack("<Q", 3) + b"abc"))


def _header(**fields: int) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        for k, val in fields.items():
            setattr(r, k, val)
        return r

    return make


def _raw_first_key(data: bytes) -> Callable[[Recipe], Recipe]:
    def make(r: Recipe) -> Recipe:
        _, vtype, value = r.kv[1]
        r.kv[1] = (Raw(data), vtype, value)
        return r

    return make


def _cases() -> Iterator[Case]:
    nan, inf = math.nan, math.inf
    tok, types, scores = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores",
    )
    # -- the container ----------------------------------------------------------------------
    yield Case("header-kv-count-huge", _header(n_kv=2**63))
    yield Case("header-tensor-count-huge", _header(n_tensors=2**62))
    yield Case("header-kv-count-too-big", lambda r: _header(n_kv=len(r.kv) + 3)(r))
    yield Case("header-tensor-count-too-big", lambda r: _header(n_tensors=len(r.tensors) + 1)(r))
    yield Case("key-length-huge", _raw_first_key(struct.pack("<Q", 2**63) + b"x"))
    yield Case("key-empty", _raw_first_key(struct.pack("<Q", 0)))
    yield Case("key-invalid-utf8", _raw_first_key(_string(b"general.\xff\xfename")), ACCEPTS)
    yield Case("key-duplicate", _duplicate_key)
    yield Case("string-length-huge", _kv("general.name", STR, Raw(struct.pack("<Q", 2**63 - 1))))
    yield Case("string-past-end", _kv("general.name", STR, Raw(struct.pack("<Q", 10**7) + b"x")))
    yield Case("array-of-strings-count-huge", _huge_array("general.tags", STR, 2**40))
    yield Case("array-of-floats-count-huge", _huge_array("general.weights", F32, 2**61))
    yield Case("value-type-invalid", _kv("general.name", 13, Raw(b"\x00" * 8)))
    yield Case("value-type-huge", _kv("general.name", 0xFFFFFFFF, Raw(b"\x00" * 8)))
    yield Case("array-element-type-invalid", _huge_array("general.tags", 99, 1))
    yield Case(
        "array-of-arrays",
        _kv("general.tags", ARR, Raw(struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U8, 0))),
    )
    yield Case("alignment-zero", _kv("general.alignment", U32, 0))
    yield Case("alignment-not-power-of-2", _kv("general.alignment", U32, 48))
    yield Case("alignment-wrong-type", _kv("general.alignment", U64, 32))
    yield Case("tensor-name-too-long", _rename("output_norm.weight", "o" * 64))
    yield Case("tensor-name-duplicate", _rename("output_norm.weight", "blk.0.ffn_norm.weight"))
    yield Case("tensor-five-dimensions", _set_shape("output_norm.weight", (N_EMBD, 1, 1, 1, 1)))
    yield Case("tensor-dimension-zero", _set_shape("output_norm.weight", (0,)))
    yield Case("tensor-dimension-negative", _set_shape("output_norm.weight", (2**64 - 32,)))
    yield Case("tensor-elements-overflow", _set_shape("output_norm.weight", (2**32, 2**32, 2**8)))
    yield Case("tensor-type-invalid", _set_type("output_norm.weight", 9999))
    yield Case("tensor-type-removed", _set_type("output_norm.weight", 4))  # the old Q4_2
    yield Case("tensor-row-not-block-multiple", _set_type("output_norm.weight", GGML_Q4_K))
    yield Case("tensor-offset-misaligned", _edit(lambda r: setattr(r.tensors[1], "offset", 1)))
    yield Case("tensor-offsets-out-of-order", _swap_offsets)
    yield Case("tensor-offset-past-end", _edit(lambda r: setattr(r.tensors[-1], "offset", 2**40)))
    yield Case("cut-in-header", _bytes(lambda b: b[:20]))
    yield Case("cut-in-metadata", _bytes(lambda b: b[:300]))
    yield Case("cut-in-vocabulary", _bytes(lambda b: b[:2000]))
    yield Case("cut-in-tensor-infos", _cut_in_tensor_infos)
    yield Case("cut-in-tensor-data", _bytes(lambda b: b[: len(b) // 2]))
    yield Case("cut-last-byte", _bytes(lambda b: b[:-1]))
    # -- hyperparameters ------------------------------------------------------------------------
    yield Case("architecture-missing", _drop("general.architecture"))
    yield Case("architecture-not-a-string", _kv("general.architecture", U32, 7))
    yield Case("architecture-empty", _kv("general.architecture", STR, ""))
    yield Case("architecture-unknown", _kv("general.architecture", STR, "zetanet"))
    yield Case("block-count-zero", _kv("llama.block_count", U32, 0), ABORTS)
    yield Case("block-count-2-31", _kv("llama.block_count", U32, 2**31), ABORTS)
    yield Case("block-count-513", _kv("llama.block_count", U32, 513), ABORTS)
    yield Case("block-count-missing", _drop("llama.block_count"))
    yield Case("block-count-string", _kv("llama.block_count", STR, "1"))
    yield Case("block-count-too-small-for-tensors", _extra_block)
    yield Case("embedding-length-zero", _kv("llama.embedding_length", U32, 0))
    yield Case("context-length-zero", _kv("llama.context_length", U32, 0), ACCEPTS)
    yield Case("head-count-zero", _kv("llama.attention.head_count", U32, 0))
    yield Case("head-count-kv-zero", _kv("llama.attention.head_count_kv", U32, 0))
    yield Case("head-count-kv-not-dividing", _kv("llama.attention.head_count_kv", U32, 3))
    yield Case(
        "head-count-array-wrong-length", _kv("llama.attention.head_count", ARR, (U32, [2, 2, 2]))
    )
    yield Case("key-and-value-length-differ", _kv("llama.attention.value_length", U32, 8))
    yield Case("rope-dimension-wrong", _kv("llama.rope.dimension_count", U32, 8))
    yield Case("feed-forward-length-zero", _kv("llama.feed_forward_length", U32, 0))
    yield Case("rms-epsilon-nan", _kv("llama.attention.layer_norm_rms_epsilon", F32, nan), ABORTS)
    yield Case(
        "rms-epsilon-infinite", _kv("llama.attention.layer_norm_rms_epsilon", F32, inf), ACCEPTS
    )
    yield Case("rms-epsilon-zero", _kv("llama.attention.layer_norm_rms_epsilon", F32, 0.0), ACCEPTS)
    yield Case(
        "rms-epsilon-negative", _kv("llama.attention.layer_norm_rms_epsilon", F32, -1.0), ABORTS
    )
    yield Case("rms-epsilon-missing", _drop("llama.attention.layer_norm_rms_epsilon"))
    yield Case("rope-freq-base-nan", _kv("llama.rope.freq_base", F32, nan), ACCEPTS)
    yield Case("pooling-type-99", _kv("llama.pooling_type", U32, 99), ABORTS)
    yield Case("rope-scaling-type-unknown", _kv("llama.rope.scaling.type", STR, "warp"), ABORTS)
    yield Case("expert-count-too-large", _kv("llama.expert_count", U32, 2000), ABORTS)
    yield Case("experts-used-without-experts", _kv("llama.expert_used_count", U32, 2), ABORTS)
    yield Case("nextn-layers-beyond-blocks", _kv("llama.nextn_predict_layers", U32, 5), ABORTS)
    # -- the vocabulary -------------------------------------------------------------------------
    yield Case("tokenizer-model-missing", _drop("tokenizer.ggml.model"))
    yield Case("tokenizer-model-none", _kv("tokenizer.ggml.model", STR, "none"))
    yield Case("tokenizer-model-unknown", _kv("tokenizer.ggml.model", STR, "zetapiece"))
    yield Case("tokens-missing", _drop(tok))
    yield Case("tokens-not-strings", _kv(tok, ARR, (I32, list(range(300)))))
    yield Case("tokens-empty", _kv(tok, ARR, (STR, [])))
    yield Case("tokens-duplicate", _tokens(lambda t: t.__setitem__(400, t[401])), ABORTS)
    yield Case("token-invalid-utf8", _tokens(lambda t: t.__setitem__(400, b"\xc3\x28bad")), ACCEPTS)
    yield Case(
        "tokens-all-empty", _tokens(lambda t: t.__setitem__(slice(None), [""] * len(t))), ABORTS
    )
    yield Case(
        "token-empty-clashes",
        _tokens(lambda t: (t.__setitem__(400, ""), t.__setitem__(401, "[EMPTY_400]"))),
        ABORTS,
    )
    yield Case("scores-short", _shorten(scores, F32))
    yield Case("scores-wrong-type", _kv(scores, ARR, (U8, [0] * 2000)))
    yield Case("token-types-short", _shorten(types, I32))
    yield Case("token-type-invalid", _set_token_type(500, 99), ACCEPTS)
    yield Case("token-types-wrong-type", _kv(types, ARR, (F32, [1.0] * 2000)))
    yield Case("byte-token-malformed", _set_token_type(500, 6), ACCEPTS)
    yield Case("spm-byte-token-missing", _replace_byte_token, ABORTS)
    yield Case("bos-out-of-vocabulary", _kv("tokenizer.ggml.bos_token_id", U32, 10**6), ACCEPTS)
    yield Case("vocabulary-larger-than-embedding", _add_token)
    # -- tensors ----------------------------------------------------------------------------
    yield Case("tensor-missing", _rename("blk.0.ffn_up.weight", "blk.0.ffn_upp.weight"))
    yield Case("tensor-shape-wrong", _set_shape("blk.0.attn_q.weight", (N_EMBD // 2, N_EMBD * 2)))


CASES: dict[str, Case] = {c.name: c for c in _cases()}


def build(case: Case) -> bytes:
    """The bytes of ``case``'s file."""
    made = case.make(copy.deepcopy(_BASE))
    return made if isinstance(made, bytes) else encode(made)


_BASE = base_recipe()


def write_corpus(directory: Path) -> dict[str, Path]:
    """Write every case (and ``base.gguf``, the valid model they start from) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, case in CASES.items():
        path = directory / f"{name}.gguf"
        path.write_bytes(build(case))
        out[name] = path
    (directory / "base.gguf").write_bytes(encode(copy.deepcopy(_BASE)))
    return out


_RAW_CHILD = """
import json, sys
from zeta import ModelSpec, Kind, ZetaError
from zeta.backends.llama_cpp import open_backend
from zeta.backends import CompletionParams
spec = ModelSpec("raw", path=sys.argv[1], n_ctx=256,
                 options={"probe": False, "gguf_check": False})
try:
    b = open_backend(spec, 0)
    print("stage: tokenize", flush=True); b.count_tokens(sys.argv[2])
    print("stage: decode", flush=True); b.complete(CompletionParams(sys.argv[2], max_tokens=2))
    print("stage: embed", flush=True); b.embed([sys.argv[2]])
    print("ok", flush=True)
except ZetaError as exc:
    print("error", type(exc).__name__, str(exc)[-200:], flush=True)
"""


#: What the unguarded run tokenizes, completes and embeds: as varied as the probe's text.
RAW_TEXT = "Hello, world! def main():\n\treturn 42 # h\u00e9llo \u65e5\u672c \x01 \U0001f642"


def _raw_outcome(path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _RAW_CHILD, str(path), RAW_TEXT],
        capture_output=True, text=True, timeout=120, env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )  # fmt: skip
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode < 0:
        return f"CRASH signal {-proc.returncode} after {last!r}: {proc.stderr.strip()[-200:]}"
    return f"exit {proc.returncode}: {last}"


def main(argv: list[str]) -> int:
    raw = "--raw" in argv
    args = [a for a in argv if a != "--raw"]
    directory = Path(args[0] if args else "hostile-gguf")
    paths = write_corpus(directory)
    print(f"wrote {len(paths)} hostile files (and base.gguf) to {directory}")
    if not raw:
        return 0
    report = {name: _raw_outcome(p) for name, p in paths.items()}
    report["base"] = _raw_outcome(directory / "base.gguf")
    print(json.dumps(report, indent=1))
    found = {name: (ABORTS if r.startswith("CRASH") else ACCEPTS if r.endswith(": ok") else REFUSES)
             for name, r in report.items()}  # fmt: skip
    wrong = {n: f"{CASES[n].llama} -> {found[n]}" for n in CASES if CASES[n].llama != found[n]}
    counts = {k: sum(1 for n in CASES if found[n] == k) for k in (ABORTS, REFUSES, ACCEPTS)}
    print(f"llama.cpp unguarded: {counts}; base: {found['base']}; flags that disagree: {wrong}")
    return 1 if wrong or found["base"] != ACCEPTS else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
