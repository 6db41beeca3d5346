"""Checks of a GGUF model file's metadata, in Python, before llama.cpp sees the file.

A model file is untrusted input. llama.cpp's GGUF container parser bounds what it reads and
refuses a bad container with an error, but the model loader and tokenizer above it trust what
the metadata says and stop the whole process (``GGML_ASSERT``, an uncaught C++ exception) on
values they did not expect: ``block_count`` 0, duplicate or invalid-UTF-8 tokens, an SPM
vocabulary without byte tokens, an unknown pooling or RoPE scaling type, a NaN norm epsilon.
:func:`check_gguf` refuses each of those with a :class:`~zeta.ModelLoadError` naming the file
and the key, so llama.cpp never sees them.

The reader is zeta's own rather than ``gguf.GGUFReader``, which memory-maps the file and trusts
its counts: every count and length here is checked against the bytes left in the file and
against fixed limits before anything is allocated, the file is read (never mapped, so a file cut
short while being read is an error, not a ``SIGBUS``), and any failure, expected or not,
becomes a ``ModelLoadError``. What a Python check cannot see, the probe in :mod:`._probe`
catches in a throwaway process.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import gguf
import numpy as np

from .._exceptions import ModelLoadError

__all__ = ["Field", "GGUFInfo", "TensorInfo", "check_gguf", "read_gguf"]

# -- limits ----------------------------------------------------------------------------------
# Far above any real model, far below what would exhaust memory.

#: Metadata key-value pairs in one file.
MAX_KV = 1 << 16
#: Tensors in one file (the largest mixture-of-experts files have a few thousand).
MAX_TENSORS = 1 << 20
#: Elements in one metadata array (vocabularies and merge lists are a few hundred thousand).
MAX_ARRAY = 1 << 24
#: Bytes in one metadata string (chat templates are tens of kilobytes).
MAX_STRING = 1 << 24
#: Bytes in one key.
MAX_KEY = 1 << 10
#: Bytes of the whole metadata and tensor-info section.
MAX_METADATA_BYTES = 1 << 29
#: ``GGML_MAX_NAME``: a tensor name is at most 63 bytes plus the terminating NUL.
MAX_TENSOR_NAME = 63
#: ``GGML_MAX_DIMS``.
MAX_DIMS = 4
#: ``LLAMA_MAX_LAYERS``: llama.cpp asserts ``0 < block_count <= 512``.
MAX_LAYERS = 512
#: ``LLAMA_MAX_EXPERTS``.
MAX_EXPERTS = 1024
#: Hidden widths, head counts and feed-forward widths beyond this are not a model.
MAX_WIDTH = 1 << 20

_CHUNK = 1 << 20
_U64 = struct.Struct("<Q")
_STRUCTS: dict[str, struct.Struct] = {}
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF value types (gguf.GGUFValueType): scalar struct formats, and which are integers or floats.
VT = gguf.GGUFValueType
_SCALAR_FORMAT: dict[int, str] = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
    VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q",
    VT.FLOAT64: "<d",
}  # fmt: skip
_NUMPY_DTYPE: dict[int, str] = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
    VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.BOOL: "<u1", VT.UINT64: "<u8", VT.INT64: "<i8",
    VT.FLOAT64: "<f8",
}  # fmt: skip
_INTEGER_TYPES = frozenset(
    {VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64}
)
_FLOAT_TYPES = frozenset({VT.FLOAT32, VT.FLOAT64})
_TYPE_NAMES = {int(t): t.name for t in VT}

# ggml types whose block layout the gguf package knows. A gap below the newest known id is a type
# ggml removed; an id above it may be a quantisation newer than this gguf package, so it is left
# to llama.cpp, which checks types cleanly (only the data-section bookkeeping is skipped then).
_QUANT_SIZES: dict[int, tuple[int, int]] = {int(t): s for t, s in gguf.GGML_QUANT_SIZES.items()}
_NEWEST_KNOWN_TYPE = max(_QUANT_SIZES)
_MAX_PLAUSIBLE_TYPE = _NEWEST_KNOWN_TYPE + 64

#: ``llama_token_type`` values (llama.h): UNDEFINED .. BYTE.
_TOKEN_TYPES = range(0, 7)
_TOKEN_TYPE_BYTE = 6
#: ``llama_pooling_type`` values a file may store: NONE, MEAN, CLS, LAST, RANK.
_POOLING_TYPES = range(0, 5)
#: What ``llama_rope_scaling_type_from_string`` knows; anything else is an assertion failure.
_ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")

_TOKENS = "tokenizer.ggml.tokens"
_SCORES = "tokenizer.ggml.scores"
_TOKEN_TYPE = "tokenizer.ggml.token_type"
_TOKENIZER_MODEL = "tokenizer.ggml.model"
#: Special-token flags that make the tokenizer emit a token, and the key naming that token.
_ADDED_SPECIALS = (
    ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id"),
    ("tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id"),
    ("tokenizer.ggml.add_sep_token", "tokenizer.ggml.seperator_token_id"),  # sic, as in GGUF
)
#: String arrays whose contents are kept; the others are only bounds-checked and skipped.
_KEPT_STRING_ARRAYS = frozenset({_TOKENS})


class _Malformed(Exception):
    """The file is not what its metadata claims; the message says how."""


@dataclass(frozen=True, slots=True)
class Field:
    """One metadata value.

    ``type`` is the GGUF value type of a scalar or of an array's elements. ``value`` is an int,
    float, bool or ``bytes`` (a string, undecoded) for a scalar; for an array a numpy array of
    numbers, a list of ``bytes``, or ``None`` for a string array that was only skipped over.
    """

    type: int
    value: Any
    is_array: bool = False
    count: int = 1


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry. ``shape`` is in ggml order (row length first); ``nbytes`` is
    ``None`` for a ggml type the gguf package does not know."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    nbytes: int | None


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What :func:`read_gguf` found: the metadata, the tensor headers and the layout."""

    version: int
    metadata: dict[str, Field]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int


# --------------------------------------------------------------------------------------------
# The bounded reader.


class _Cursor:
    """Sequential reads from a file with every length checked against what is left of it."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._size = size
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def remaining(self) -> int:
        return self._size - self.offset

    def _fill(self, n: int, what: str) -> None:
        """Make the next ``n`` bytes available in the buffer, or say why they are not there."""
        if n > self.remaining():
            raise _Malformed(
                f"{what} needs {n} bytes at offset {self.offset}, but the file ends "
                f"{self.remaining()} bytes later (truncated or corrupt metadata)"
            )
        if self.offset + n > MAX_METADATA_BYTES:
            raise _Malformed(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        rest = self._buf[self._pos :]
        more = self._f.read(max(n - len(rest), _CHUNK))
        self._buf, self._pos = rest + more, 0
        if len(self._buf) < n:
            raise _Malformed("the file is shorter than its size (was it changed while read?)")

    def take(self, n: int, what: str) -> bytes:
        if len(self._buf) - self._pos < n:
            self._fill(n, what)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        st = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        return st.unpack(self.take(st.size, what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if n > limit:
            raise _Malformed(f"{what} claims {n} bytes (the limit is {limit})")
        return self.take(n, what)

    def strings(self, count: int, what: str, *, keep: bool) -> list[bytes] | None:
        """``count`` strings (a vocabulary has hundreds of thousands: this is the hot loop)."""
        out: list[bytes] | None = [] if keep else None
        u64 = _U64.unpack_from
        for i in range(count):
            if len(self._buf) - self._pos < 8:
                self._fill(8, f"length of {what}[{i}]")
            (n,) = u64(self._buf, self._pos)
            if n > MAX_STRING:
                raise _Malformed(f"{what}[{i}] claims {n} bytes (the limit is {MAX_STRING})")
            end = self._pos + 8 + n
            if end > len(self._buf):
                self._fill(8 + n, f"{what}[{i}]")
                end = self._pos + 8 + n
            if out is not None:
                out.append(self._buf[self._pos + 8 : end])
            self.offset += end - self._pos
            self._pos = end
        return out


def _count(cur: _Cursor, what: str, limit: int, min_item: int) -> int:
    n: int = cur.unpack("<Q", f"count of {what}")
    if n > limit or n * min_item > cur.remaining():
        raise _Malformed(
            f"{what} claims {n} entries; the file has room for at most "
            f"{cur.remaining() // max(min_item, 1)} (limit {limit})"
        )
    return n


def _value_type(cur: _Cursor, what: str, *, in_array: bool) -> int:
    vt: int = cur.unpack("<I", f"type of {what}")
    if vt not in _TYPE_NAMES or (in_array and vt == VT.ARRAY):
        kind = "array element type" if in_array else "value type"
        raise _Malformed(f"{what} has invalid {kind} {vt}")
    return vt


def _read_value(cur: _Cursor, key: str) -> Field:
    vt = _value_type(cur, key, in_array=False)
    if vt == VT.STRING:
        return Field(vt, cur.string(key))
    if vt != VT.ARRAY:
        fmt = _SCALAR_FORMAT[vt]
        value: Any = cur.unpack(fmt, key)
        return Field(vt, bool(value) if vt == VT.BOOL else value)
    et = _value_type(cur, key, in_array=True)
    if et == VT.STRING:
        n = _count(cur, key, MAX_ARRAY, 8)
        return Field(et, cur.strings(n, key, keep=key in _KEPT_STRING_ARRAYS), True, n)
    dtype = np.dtype(_NUMPY_DTYPE[et])
    n = _count(cur, key, MAX_ARRAY, dtype.itemsize)
    data = np.frombuffer(cur.take(n * dtype.itemsize, key), dtype=dtype)
    return Field(et, data, True, n)


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _read_tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
    name = _utf8(cur.string(f"name of tensor {i}", limit=1 << 16), f"name of tensor {i}")
    if not name or len(name.encode()) > MAX_TENSOR_NAME:
        raise _Malformed(f"tensor {i} name {name[:80]!r} must be 1 to {MAX_TENSOR_NAME} bytes")
    n_dims: int = cur.unpack("<I", f"dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise _Malformed(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    shape = tuple(int(cur.unpack("<Q", f"shape of tensor {name!r}")) for _ in range(n_dims))
    ggml_type: int = cur.unpack("<I", f"type of tensor {name!r}")
    offset: int = cur.unpack("<Q", f"data offset of tensor {name!r}")
    return name, shape, ggml_type, offset


def _tensor_nbytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int | None:
    n = 1
    for d in shape:
        if d < 1 or d >= 1 << 62:
            raise _Malformed(
                f"tensor {name!r} has shape {list(shape)}; every dimension must be >= 1"
            )
        n *= d
    if n >= 1 << 62:
        raise _Malformed(f"tensor {name!r} has {n} elements, more than any file can hold")
    sizes = _QUANT_SIZES.get(ggml_type)
    if sizes is None:
        if ggml_type < _NEWEST_KNOWN_TYPE:
            raise _Malformed(f"tensor {name!r} has ggml type {ggml_type}, which ggml removed")
        if ggml_type > _MAX_PLAUSIBLE_TYPE:
            raise _Malformed(f"tensor {name!r} has invalid ggml type {ggml_type}")
        return None
    block, type_size = sizes
    row = shape[0] if shape else 1
    if row % block:
        raise _Malformed(
            f"tensor {name!r} of type {ggml_type} has rows of {row} elements, not a multiple "
            f"of its block size {block}"
        )
    return n // block * type_size


def _read(f: BinaryIO, size: int) -> GGUFInfo:
    cur = _Cursor(f, size)
    if cur.take(4, "magic") != b"GGUF":
        raise _Malformed("not a GGUF file")
    version: int = cur.unpack("<I", "version")
    if version not in _GGUF_VERSIONS:
        raise _Malformed(f"unsupported GGUF version {version} (supported: {_GGUF_VERSIONS})")
    n_tensors: int = cur.unpack("<Q", "tensor count")
    n_kv: int = cur.unpack("<Q", "metadata count")
    # Smallest possible entries: a tensor info is 24 bytes, a key-value pair 13.
    for what, n, limit, least in (("tensors", n_tensors, MAX_TENSORS, 24),
                                  ("metadata entries", n_kv, MAX_KV, 13)):  # fmt: skip
        if n > limit or n * least > cur.remaining():
            raise _Malformed(
                f"header claims {n} {what}, more than the limit of {limit} or than the "
                f"{cur.remaining()} bytes left can hold (truncated or corrupt metadata)"
            )

    metadata: dict[str, Field] = {}
    for i in range(n_kv):
        key = _utf8(cur.string(f"key {i}", limit=MAX_KEY), f"key {i}")
        if not key:
            raise _Malformed(f"metadata key {i} is empty")
        if key in metadata:
            raise _Malformed(f"duplicate metadata key {key!r}")
        metadata[key] = _read_value(cur, key)

    alignment = _DEFAULT_ALIGNMENT
    field = metadata.get("general.alignment")
    if field is not None:
        if field.type != VT.UINT32 or field.is_array:
            raise _Malformed("general.alignment must be a uint32")
        alignment = int(field.value)
        if alignment <= 0 or alignment & (alignment - 1):
            raise _Malformed(f"general.alignment {alignment} is not a power of 2")

    raw = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    data_offset = -(-cur.offset // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    expected: int | None = 0  # where the next tensor must start, while every size is known
    for name, shape, ggml_type, offset in raw:
        if name in tensors:
            raise _Malformed(f"duplicate tensor name {name!r}")
        nbytes = _tensor_nbytes(name, shape, ggml_type)
        if offset % alignment:
            raise _Malformed(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        if expected is not None and offset != expected:
            raise _Malformed(f"tensor {name!r} has data offset {offset}, expected {expected}")
        if nbytes is not None and data_offset + offset + nbytes > size:
            raise _Malformed(
                f"tensor {name!r} data is not within the file bounds (it ends at byte "
                f"{data_offset + offset + nbytes}, the file has {size})"
            )
        expected = None if nbytes is None or expected is None else offset + nbytes
        if expected is not None:
            expected = -(-expected // alignment) * alignment
        tensors[name] = TensorInfo(name, shape, ggml_type, offset, nbytes)
    return GGUFInfo(version, metadata, tensors, alignment, data_offset, size)


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse the metadata and tensor headers of the GGUF file at ``path``, with bounds.

    Raises:
        ModelLoadError: naming the file, for anything that is not a well-formed GGUF container.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            return _read(f, os.fstat(f.fileno()).st_size)
    except _Malformed as exc:
        raise ModelLoadError(str(exc), path=p) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read: {exc.strerror or exc}", path=p) from None
    except Exception as exc:  # a hostile file must never get anything else past this point
        raise ModelLoadError(f"malformed GGUF ({type(exc).__name__}: {exc})", path=p) from None


# --------------------------------------------------------------------------------------------
# What llama.cpp trusts in the metadata.


class _Metadata:
    """Typed access to the metadata, raising :class:`_Malformed` naming the key."""

    def __init__(self, info: GGUFInfo) -> None:
        self.fields = info.metadata

    def _scalar(self, key: str, types: frozenset[int], kind: str) -> Field | None:
        field = self.fields.get(key)
        if field is None:
            return None
        if field.is_array or field.type not in types:
            got = (
                f"an array of {_TYPE_NAMES[field.type]}"
                if field.is_array
                else _TYPE_NAMES[field.type]
            )
            raise _Malformed(f"metadata {key} must be {kind}, not {got}")
        return field

    def get_int(self, key: str, *, required: bool = False) -> int | None:
        field = self._scalar(key, _INTEGER_TYPES, "an integer")
        if field is None and required:
            raise _Malformed(f"metadata {key} is missing")
        return None if field is None else int(field.value)

    def get_float(self, key: str) -> float | None:
        field = self._scalar(key, _FLOAT_TYPES | _INTEGER_TYPES, "a number")
        return None if field is None else float(field.value)

    def get_bool(self, key: str) -> bool | None:
        field = self._scalar(key, frozenset({VT.BOOL}), "a bool")
        return None if field is None else bool(field.value)

    def get_str(self, key: str, *, required: bool = False) -> str | None:
        field = self._scalar(key, frozenset({VT.STRING}), "a string")
        if field is None:
            if required:
                raise _Malformed(f"metadata {key} is missing")
            return None
        return _utf8(field.value, f"metadata {key}")

    def per_layer(self, key: str, n_layer: int) -> list[int] | None:
        """An integer or a per-layer array of integers (llama.cpp's ``get_key_or_arr``)."""
        field = self.fields.get(key)
        if field is None:
            return None
        if not field.is_array:
            value = self.get_int(key)
            assert value is not None
            return [value] * n_layer
        if field.type not in _INTEGER_TYPES:
            raise _Malformed(f"metadata {key} must be integers, not {_TYPE_NAMES[field.type]}")
        if field.count != n_layer:
            raise _Malformed(f"metadata {key} has {field.count} entries for {n_layer} blocks")
        return [int(v) for v in field.value]


def _in_range(key: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise _Malformed(f"metadata {key} is {value}; it must be in [{low}, {high}]")


def _check_model(md: _Metadata, info: GGUFInfo) -> tuple[str, int]:
    """The architecture's hyperparameters; returns the architecture and its block count."""
    arch = md.get_str("general.architecture", required=True)
    assert arch is not None
    if not arch or not arch.isascii() or not arch.isprintable() or len(arch) > 64:
        raise _Malformed(f"general.architecture {arch[:80]!r} is not an architecture name")
    a = f"{arch}."
    n_layer = md.get_int(a + "block_count", required=True)
    assert n_layer is not None
    _in_range(a + "block_count", n_layer, 1, MAX_LAYERS)
    _in_range(a + "nextn_predict_layers", md.get_int(a + "nextn_predict_layers"), 0, n_layer)
    n_embd = md.get_int(a + "embedding_length")
    _in_range(a + "embedding_length", n_embd, 1, MAX_WIDTH)
    _in_range(a + "context_length", md.get_int(a + "context_length"), 1, 1 << 31)

    # Mixture-of-experts counts, as llama.cpp asserts them while loading.
    n_expert = md.get_int(a + "expert_count") or 0
    _in_range(a + "expert_count", n_expert, 0, MAX_EXPERTS)
    used = max(md.per_layer(a + "expert_used_count", n_layer) or [0])
    groups = md.get_int(a + "expert_group_count") or 0
    group_used = md.get_int(a + "expert_group_used_count") or 0
    if n_expert > 0:
        _in_range(a + "expert_used_count", used, 1, n_expert)
        _in_range(a + "expert_group_count", groups, 0, n_expert - 1)
        if groups > 1:
            if n_expert % groups:
                raise _Malformed(f"{a}expert_count {n_expert} is not a multiple of {groups} groups")
            _in_range(a + "expert_group_used_count", group_used, 1, groups - 1)
    elif used or groups:
        raise _Malformed(f"{a}expert_count is 0 but experts are used or grouped")

    n_head = md.per_layer(a + "attention.head_count", n_layer)
    n_head_kv = md.per_layer(a + "attention.head_count_kv", n_layer)
    for key, values in (("attention.head_count", n_head), ("attention.head_count_kv", n_head_kv)):
        for v in values or ():
            _in_range(a + key, v, 0, MAX_WIDTH)
    n_ff = md.per_layer(a + "feed_forward_length", n_layer)
    for v in n_ff or ():
        _in_range(a + "feed_forward_length", v, 0, MAX_WIDTH)

    scaling = md.get_str(a + "rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise _Malformed(
            f"{a}rope.scaling.type {scaling!r} is not one of {sorted(_ROPE_SCALING_TYPES)}"
        )
    for key in (a + "pooling_type", a + "classifier.pooling_type"):
        pooling = md.get_int(key)
        if pooling is not None and pooling not in _POOLING_TYPES:
            raise _Malformed(f"metadata {key} is {pooling}; llama.cpp knows 0 to 4")

    # No hyperparameter is meaningfully NaN or infinite; norm epsilons must also be positive.
    for key, field in md.fields.items():
        if key.startswith(a) and field.type in _FLOAT_TYPES:
            numbers = field.value if field.is_array else np.array([field.value])
            if not np.all(np.isfinite(numbers)):
                raise _Malformed(f"metadata {key} is not finite")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        eps = md.get_float(a + key)
        if eps is not None and not eps > 0.0:
            raise _Malformed(f"metadata {a}{key} is {eps}; it must be > 0")
    base = md.get_float(a + "rope.freq_base")
    if base is not None and not base > 0.0:
        raise _Malformed(f"metadata {a}rope.freq_base is {base}; it must be > 0")

    # Blocks beyond block_count are never read by llama.cpp; a file that has them lies about it.
    for name in info.tensors:
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            if index.isdigit() and int(index) >= n_layer:
                raise _Malformed(f"tensor {name!r} belongs to a block beyond block_count {n_layer}")

    if arch == "llama":
        _check_llama(md, info, n_layer, n_embd, n_head, n_head_kv, n_ff, n_expert)
    return arch, n_layer


def _check_llama(
    md: _Metadata,
    info: GGUFInfo,
    n_layer: int,
    n_embd: int | None,
    n_head: list[int] | None,
    n_head_kv: list[int] | None,
    n_ff: list[int] | None,
    n_expert: int,
) -> None:
    """The llama architecture's shapes, which its compute graph asserts rather than checks."""
    a = "llama."
    if n_embd is None:
        raise _Malformed(f"metadata {a}embedding_length is missing")
    if n_head is None:
        raise _Malformed(f"metadata {a}attention.head_count is missing")
    if md.get_float(a + "attention.layer_norm_rms_epsilon") is None:
        raise _Malformed(f"metadata {a}attention.layer_norm_rms_epsilon is missing")
    kv = n_head_kv or n_head
    for il in range(n_layer):
        if n_head[il] < 1:
            raise _Malformed(f"{a}attention.head_count is {n_head[il]} for block {il}")
        if kv[il] < 1 or n_head[il] % kv[il]:
            raise _Malformed(
                f"{a}attention.head_count_kv {kv[il]} does not divide head_count {n_head[il]}"
            )
        if n_expert == 0 and (n_ff is None or n_ff[il] < 1):
            raise _Malformed(f"{a}feed_forward_length must be >= 1 for block {il}")
    key_length = md.get_int(a + "attention.key_length")
    value_length = md.get_int(a + "attention.value_length")
    if key_length is None and n_embd % n_head[0]:
        raise _Malformed(
            f"{a}embedding_length {n_embd} is not a multiple of head_count {n_head[0]}"
        )
    head_k = key_length if key_length is not None else n_embd // n_head[0]
    head_v = value_length if value_length is not None else n_embd // n_head[0]
    if head_k != head_v or head_k < 1:
        raise _Malformed(f"{a}attention key length {head_k} and value length {head_v} differ")
    n_rot = md.get_int(a + "rope.dimension_count")
    if n_rot is not None and n_rot != head_k:
        raise _Malformed(f"{a}rope.dimension_count {n_rot} is not the head size {head_k}")
    n_vocab = len(md.fields[_TOKENS].value or ()) if _TOKENS in md.fields else 0
    for name, want in (("token_embd.weight", (n_embd, n_vocab)), ("output.weight", (n_embd, n_vocab)),
                       ("output_norm.weight", (n_embd,))):  # fmt: skip
        t = info.tensors.get(name)
        if t is None:
            if name == "token_embd.weight":
                raise _Malformed("tensor 'token_embd.weight' is missing")
            continue
        if t.shape != want:
            raise _Malformed(
                f"tensor {name!r} has shape {list(t.shape)}; the metadata implies {list(want)}"
            )


def _check_vocab(md: _Metadata) -> None:
    """The tokenizer: llama.cpp asserts rather than checks most of what is here."""
    model = md.get_str(_TOKENIZER_MODEL, required=True)
    if model in ("none", "no_vocab"):
        raise _Malformed(f"has no tokenizer ({_TOKENIZER_MODEL} is {model!r}); zeta needs one")
    field = md.fields.get(_TOKENS)
    if field is None:
        raise _Malformed(f"metadata {_TOKENS} is missing")
    if not field.is_array or field.type != VT.STRING:
        raise _Malformed(f"metadata {_TOKENS} must be an array of strings")
    tokens: list[bytes] = field.value
    n = len(tokens)
    if n == 0:
        raise _Malformed(f"metadata {_TOKENS} is empty")
    seen: dict[bytes, int] = {}
    for i, raw in enumerate(tokens):
        _utf8(raw, f"token {i}")
        # llama.cpp renames an empty token to "[EMPTY_<i>]"; a clash with a real token of that
        # name is a duplicate too.
        text = raw or f"[EMPTY_{i}]".encode()
        first = seen.setdefault(text, i)
        if first != i:
            raise _Malformed(f"tokens {first} and {i} are both {text[:40]!r}")
    if len(seen) == sum(1 for t in tokens if not t):
        raise _Malformed("every token is empty")

    scores = md.fields.get(_SCORES)
    if scores is not None:
        if not scores.is_array or scores.type not in (VT.FLOAT32, VT.INT32):
            raise _Malformed(f"metadata {_SCORES} must be an array of float32 or int32")
        if scores.count < n:
            raise _Malformed(f"metadata {_SCORES} has {scores.count} entries for {n} tokens")
    types = md.fields.get(_TOKEN_TYPE)
    byte_tokens: set[bytes] = set()
    if types is not None:
        if not types.is_array or types.type != VT.INT32:
            raise _Malformed(f"metadata {_TOKEN_TYPE} must be an array of int32")
        if types.count < n:
            raise _Malformed(f"metadata {_TOKEN_TYPE} has {types.count} entries for {n} tokens")
        values = types.value[:n]
        bad = np.flatnonzero((values < _TOKEN_TYPES.start) | (values >= _TOKEN_TYPES.stop))
        if bad.size:
            first = int(bad[0])
            raise _Malformed(f"token {first} has invalid token type {int(values[first])}")
        for index in np.flatnonzero(values == _TOKEN_TYPE_BYTE).tolist():
            text = tokens[index]
            if not _BYTE_TOKEN.fullmatch(text):
                raise _Malformed(f"token {index} {text[:40]!r} is a byte token but not <0xXX>")
            byte_tokens.add(text)

    if model == "llama":
        # The SPM tokenizer falls back to byte tokens for text no piece covers; a byte without
        # one throws out of llama_tokenize, which aborts the process.
        present = set(tokens)
        for b in range(256):
            if f"<0x{b:02X}>".encode() not in present and (b >= 0x80 or bytes([b]) not in present):
                raise _Malformed(
                    f"the SPM vocabulary has no token for byte 0x{b:02X}; llama.cpp aborts on "
                    "text that needs it"
                )

    for flag, id_key in _ADDED_SPECIALS:
        token_id = md.get_int(id_key)
        if md.get_bool(flag) and token_id is not None and not 0 <= token_id < n:
            raise _Malformed(f"metadata {flag} is set but {id_key} {token_id} is not a token")


def _check_metadata(info: GGUFInfo) -> str:
    """Check what llama.cpp trusts in parsed metadata; returns the architecture name.

    Raises:
        _Malformed: the first problem found (:func:`check_gguf` turns it into a
            :class:`~zeta.ModelLoadError`).
    """
    md = _Metadata(info)
    _check_vocab(md)
    arch, _ = _check_model(md, info)
    return arch


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse ``path`` with bounds and check what llama.cpp would trust; return what was read.

    Checks the container (counts, lengths, types, duplicate keys and tensor names, alignment,
    tensor shapes, types and offsets, data within the file), the architecture's hyperparameters
    (block count, widths, head counts, experts, finite positive epsilons, known pooling and RoPE
    scaling types; for ``llama`` also head sizes and embedding shapes against the vocabulary),
    and the vocabulary (present, valid UTF-8, unique, token types and byte tokens valid, every
    byte reachable in an SPM vocabulary, added special tokens in range).

    Raises:
        ModelLoadError: naming the file and the first problem found.
    """
    info = read_gguf(path)
    p = os.fspath(path)
    try:
        _check_metadata(info)
    except _Malformed as exc:
        raise ModelLoadError(str(exc), path=p) from None
    except Exception as exc:  # defence in depth: a check must never crash on odd metadata
        raise ModelLoadError(
            f"malformed GGUF metadata ({type(exc).__name__}: {exc})", path=p
        ) from None
    return info
