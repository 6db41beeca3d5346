"""The llama.cpp backend: one llama.cpp context per actor, on llama-cpp-python's C bindings.

It drives the ``llama_cpp`` C API directly rather than the high-level ``llama_cpp.Llama`` class,
for three reasons:

* ``Llama(verbose=False)`` silences llama.cpp by ``dup2``-ing the process's stdout and stderr to
  ``/dev/null`` while it loads. File descriptors are process-wide, so two replicas loading at
  once, or the event loop printing meanwhile, can lose output or leave stderr pointing at
  ``/dev/null`` for good. Here llama.cpp's log goes through :func:`llama_cpp.llama_log_set` into
  zeta's logging instead, and nothing is printed.
* ``Llama`` runs one sequence at a time. :class:`LlamaCppBackend` decodes up to
  ``ModelSpec.slots`` sequences together (continuous batching, as llama.cpp's server does), and
  its token accounting is exact: the router's per-token cost estimate is fed from it. Each
  sequence samples, counts and decodes one token per step, turns bytes into text with an
  incremental UTF-8 decoder (a character split across tokens is emitted once whole), and never
  returns more than ``max_tokens`` tokens.
* One context serves both completions and embeddings: :meth:`LlamaCppBackend.embed` switches the
  context into embeddings mode for the call (``llama_set_embeddings``) and back, so a model that
  serves several kinds costs one context, not two.

Slots and the KV cache. The context has ``n_seq_max = slots`` sequence ids, one per slot, and
one *unified* KV buffer (``kv_unified``) of ``n_ctx * slots`` cells. llama.cpp's alternative,
one stream of ``n_ctx`` cells per sequence, splits a batch into micro-batches of consecutive
sequence ids with equally many tokens each, so a step over slots 0, 2 and 5 would run as three
graphs (no batching at all once slots free up out of order), and a pooled embedding of texts of
different lengths would be split mid-text. The unified buffer takes any mix in one micro-batch.
Every slot is still guaranteed its ``n_ctx`` cells: :meth:`~LlamaCppBackend.admit` refuses a
request whose prompt plus ``max_tokens`` exceeds ``n_ctx``, so no sequence, running or cached,
ever holds more than ``n_ctx`` cells, and ``slots`` of them fit the buffer (llama.cpp places a
token in any free cell).

A step is one ``llama_decode`` of one batch: the last sampled token of every decoding sequence,
then prompt chunks of the sequences still prefilling, first admitted first, at most
``prefill_chunk`` prompt tokens in all, so a long prompt is read over several steps while the
running sequences keep streaming. Each sequence samples its next token with its own sampler chain
from its own row of logits. When a request ends, its slot keeps its tokens' KV cells: the next
admission picks the free slot whose cached tokens share the longest prefix with its prompt
(llama.cpp server style), drops the rest, and prefills only the new suffix (``prefix_hits`` and
``prefix_tokens_reused`` count this). Embeddings are decoded between steps, several texts per
batch under the sequence ids of free slots, whose cached prefixes they replace.

Batching and exact results. Flash attention (on under ``"auto"``) skips the cells of other
sequences in the unified buffer, so a slot holding a cached prefix costs a running sequence
nothing. But llama.cpp's CPU kernel takes different paths by the number of tokens in a batch
(half-precision accumulation for a few queries, tiled single precision for many), so a
sequence's logits can differ in their last bits with what else shares its step, and a greedy
near-tie can then flip (in one or two requests in a hundred on the ladder's random-weight
models). With ``flash_attn = false`` attention is exact single precision per sequence, and a
greedy request produces the same tokens alone or batched; but it computes over every cell in
use, so a context whose idle slots hold cached prefixes decodes slower (by a fifth to a third
with 16 slots on the ladder's coder). GPU kernels give no such guarantee either way.

A model file is untrusted input, and llama.cpp aborts the whole process on some malformed ones.
So before llama.cpp sees a file, :func:`~zeta.backends._gguf_check.check_gguf` checks its metadata
in Python, and a file not yet verified is opened once in a throwaway process by the load probe
(:mod:`zeta.backends._probe`): a crash there becomes a :class:`~zeta.ModelLoadError` naming the
file.

``ModelSpec.options`` (all optional):

* ``n_batch`` (default 512, at least ``slots``): tokens one ``llama_decode`` takes (also its
  micro-batch size); a text to embed is truncated to it.
* ``prefill_chunk`` (default 256): prompt tokens read per step, across every prefilling sequence.
* ``flash_attn`` (``"auto"``, the default and llama.cpp's, or ``true`` or ``false``): see above.
* ``top_k``, ``top_p``, ``min_p`` (defaults 40, 0.95, 0.05): sampling when ``temperature > 0``.
* ``n_threads_batch`` (default ``n_threads``), ``pooling`` (``"model"``, ``"none"``, ``"mean"``,
  ``"cls"``, ``"last"``), ``use_mmap`` (default ``true``).
* ``gguf_check`` (default ``true``): the metadata check. Turn it off only for a file it wrongly
  refuses; the probe still protects the process.
* ``probe`` (default ``true``): probe files not yet verified. Verdicts are cached by the file's
  SHA-256, so each file is probed once; files the model ladder wrote are trusted. ``false`` loads
  unverified files directly, in this process.
* ``probe_timeout_s`` (default 300): how long the probe may take to load and use the model.

Chat. A chat request's messages are rendered with the model's own ``tokenizer.chat_template``
(in Jinja2's sandbox, :class:`~zeta._chat.ChatTemplate`; a model without one gets the ChatML
fallback) and the result is tokenized with special tokens parsed, as llama.cpp's server does, so
the template's turn markers become control tokens. Unlike the server, text the caller wrote
(messages, tools) that spells a control token stays plain text: it is swapped for a placeholder
before rendering and tokenized on its own without special parsing, so a message cannot forge a
turn (:class:`~zeta._chat.ControlText`). A reply constrained to a JSON schema
(``response_format`` or a forced tool call) samples through a grammar sampler built from the
schema by llama-cpp-python's converter (with integer bounds added, :mod:`._grammar`), ahead of the usual chain, so every token
keeps the output a prefix of a valid instance; once the instance is complete only end-of-generation
tokens remain.

Every per-request input problem (text that is not valid Unicode, a prompt and ``max_tokens``
that do not fit a slot, a parameter out of range, a template that cannot render the messages, a
schema llama.cpp cannot turn into a grammar) raises :class:`~zeta.InvalidRequestError` and leaves
the context usable.

``llama_cpp`` is imported on first use, so importing zeta never needs it.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import logging
import math
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._chat import ChatTemplate, ControlText
from .._exceptions import (
    BackendError,
    ConfigError,
    ContextWindowExceeded,
    InvalidRequestError,
    ModelLoadError,
)
from .._types import Kind, ModelSpec
from ..telemetry._logging import get_logger
from ._base import Completion, CompletionParams, Embedding, TokenCallback, run_alone
from ._gguf_check import check_gguf
from ._grammar import json_schema_grammar
from ._probe import ProbeRequest, verify

__all__ = ["LlamaCppBackend", "check_model_file", "open_backend"]

log = get_logger(__name__)

#: Logger that llama.cpp's own log lines go to. Its INFO chatter (hundreds of lines per model
#: load) is logged at DEBUG; warnings and errors keep their level.
native_log = logging.getLogger("zeta.backends.llama_cpp.native")
# Without this, an application that never configures logging would see llama.cpp's warnings on
# stderr through logging's last-resort handler: silent unless asked for.
native_log.addHandler(logging.NullHandler())

_GGUF_MAGIC = b"GGUF"
_GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_GGUF_VERSIONS = (2, 3)

# ggml_log_level (ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT (continues the previous line).
_NATIVE_LEVELS = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.WARNING,
    4: logging.ERROR,
}
_CONT = 5

_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}

#: llama_flash_attn_type by option value: AUTO, DISABLED, ENABLED.
_FLASH_ATTN: dict[object, int] = {"auto": -1, False: 0, True: 1}

#: JSON-schema grammars kept per context.
_GRAMMAR_CACHE = 64
#: The largest text llama_tokenize takes: its length is an int32.
_MAX_TEXT_BYTES = 0x7FFFFFFF - 8

#: The most KV cells a context can have: llama.cpp keeps the count in a uint32 and pads it to 256.
_MAX_KV_CELLS = 2**32 - 256

#: Sampling used when ``temperature > 0``: llama.cpp's usual defaults, overridable per model
#: through ``ModelSpec.options``.
_SAMPLING_DEFAULTS: dict[str, float] = {"top_k": 40, "top_p": 0.95, "min_p": 0.05}


# --------------------------------------------------------------------------------------------
# The library, loaded once, with llama.cpp's log routed into Python logging.

_lib_lock = threading.Lock()
_lib: Any = None
#: The ctypes callback handed to llama.cpp. It must outlive every llama.cpp call that may log,
#: so it is kept here for the life of the process.
_log_callback: Any = None


class _NativeLogState(threading.local):
    """Per-thread state of the log bridge: llama.cpp logs from whichever thread calls it."""

    def __init__(self) -> None:
        self.partial = ""
        self.level = logging.DEBUG
        self.captured: list[str] | None = None


_native = _NativeLogState()


def _emit_native(level: int, line: str) -> None:
    line = line.rstrip()
    if not line:
        return
    if _native.captured is not None and level >= logging.WARNING:
        _native.captured.append(line)
    native_log.log(level, "%s", line)


def _on_native_log(level: int, text: bytes | None, _user_data: object) -> None:
    """llama.cpp log callback: split into lines and forward to :data:`native_log`.

    An exception must never propagate into C (ctypes would print it to stderr), so a failure
    to log is dropped.
    """
    if text is None:
        return
    with contextlib.suppress(Exception):
        if level != _CONT:
            if _native.partial:  # a new message starts: flush an unterminated previous one
                _emit_native(_native.level, _native.partial)
                _native.partial = ""
            _native.level = _NATIVE_LEVELS.get(level, logging.DEBUG)
        lines = (_native.partial + text.decode("utf-8", "replace")).split("\n")
        _native.partial = lines.pop()
        for line in lines:
            _emit_native(_native.level, line)


@contextlib.contextmanager
def _capturing_native_errors() -> Iterator[list[str]]:
    """Collect the warning and error lines llama.cpp logs on this thread inside the block."""
    previous, _native.captured = _native.captured, []
    try:
        yield _native.captured
    finally:
        if _native.partial:
            _emit_native(_native.level, _native.partial)
            _native.partial = ""
        _native.captured = previous


def _llama() -> Any:
    """Import ``llama_cpp`` once, route its log into ours and initialise the backend."""
    global _lib, _log_callback
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                import llama_cpp  # heavy and optional: imported only when this backend is chosen

                _log_callback = llama_cpp.llama_log_callback(_on_native_log)
                llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
                llama_cpp.llama_backend_init()
                _lib = llama_cpp
    return _lib


# --------------------------------------------------------------------------------------------
# Model file checks, before llama.cpp sees the file.


def check_model_file(path: str | os.PathLike[str] | None) -> Path:
    """Check that ``path`` names a readable GGUF file and return it; llama.cpp is not involved.

    Catches what can be told from the file system and the fixed 24-byte header: a missing path,
    a directory, an empty or truncated file, a wrong magic, an unknown version. The metadata
    further in is checked by :func:`~zeta.backends._gguf_check.check_gguf`.

    Raises:
        ModelLoadError: naming the file and the problem.
    """
    if path is None or os.fspath(path) == "":
        raise ModelLoadError("no model file given (ModelSpec.path is empty)")
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelLoadError("no such file", path=str(p)) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot access: {exc.strerror or exc}", path=str(p)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelLoadError("is a directory, not a GGUF file", path=str(p))
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError("is not a regular file", path=str(p))
    if st.st_size == 0:
        raise ModelLoadError("is empty (0 bytes)", path=str(p))
    try:
        with p.open("rb") as f:
            head = f.read(_GGUF_HEADER.size)
    except OSError as exc:
        raise ModelLoadError(f"cannot read: {exc.strerror or exc}", path=str(p)) from None
    if len(head) >= 4 and head[:4] != _GGUF_MAGIC:
        raise ModelLoadError(
            f"not a GGUF file (starts with {head[:4]!r}, expected {_GGUF_MAGIC!r})", path=str(p)
        )
    if len(head) < _GGUF_HEADER.size:
        raise ModelLoadError(
            f"truncated: {st.st_size} bytes is shorter than a GGUF header", path=str(p)
        )
    _, version, _, _ = _GGUF_HEADER.unpack(head)
    if version not in _GGUF_VERSIONS:
        raise ModelLoadError(
            f"unsupported GGUF version {version} (supported: {_GGUF_VERSIONS})", path=str(p)
        )
    return p


# --------------------------------------------------------------------------------------------
# The backend.


def _option(
    spec: ModelSpec,
    key: str,
    kind: type,
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """``spec.options[key]`` checked for type and range, or ``default``."""
    value: Any = spec.options.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        bounds = "" if low is None else f" in [{low}, {'inf' if high is None else high}]"
        raise ConfigError(
            f"must be {kind.__name__}{bounds}, got {value!r}",
            key=f"models.{spec.name}.options.{key}",
        )
    return value


class _Slot:
    """One sequence id of the context: the tokens its KV cells hold, and who decodes in it."""

    __slots__ = ("cached", "id", "seq", "used_at")

    def __init__(self, index: int) -> None:
        self.id = index
        #: Tokens whose keys and values are in the KV cache for this sequence id, in order. Kept
        #: after a request ends, so the next one with the same prefix decodes only the rest.
        self.cached: list[int] = []
        self.seq: _Sequence | None = None
        #: When the slot last ended a request (a counter), for least-recently-used choice.
        self.used_at = 0


class _Sequence:
    """One admitted completion: its prompt, its own sampler chain, and the text produced so far."""

    __slots__ = (
        "at_stop_string", "budget", "decoder", "fed", "first_token_s", "key", "logit_idx",
        "longest_stop", "n_out", "next_token", "on_token", "out", "pending", "prompt", "sampler",
        "slot", "start", "stops",
    )  # fmt: skip

    def __init__(
        self,
        key: int,
        slot: _Slot,
        params: CompletionParams,
        on_token: TokenCallback | None,
        prompt: list[int],
        sampler: Any,
        start: float,
    ) -> None:
        self.key = key
        self.slot = slot
        self.on_token = on_token
        self.prompt = prompt
        #: Prompt tokens in the KV cache (a reused prefix, then the chunks prefilled so far).
        self.fed = len(slot.cached)
        self.sampler = sampler
        self.budget = params.max_tokens
        self.stops = tuple(s for s in params.stop if s)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.out: list[str] = []  # text already handed out (or final)
        self.pending = ""  # decoded text held back as a possible stop-string start
        self.at_stop_string = False
        self.n_out = 0
        #: The last sampled token, to be decoded by the next step; -1 while prefilling.
        self.next_token = -1
        #: Index in the current step's batch of the token whose logits this sequence samples.
        self.logit_idx = -1
        self.start = start
        self.first_token_s = 0.0


class LlamaCppBackend:
    """One llama.cpp context for one replica of a model, decoding up to ``spec.slots``
    completions together (a :class:`~zeta.backends._base.BatchBackend`).

    Every method blocks. The owning actor calls them from one worker thread at a time; a second
    thread entering while a call runs gets :class:`~zeta.BackendError` instead of the abort
    llama.cpp would give it.
    """

    spec: ModelSpec

    def __init__(self, spec: ModelSpec, replica: int = 0) -> None:
        self.spec = spec
        self.replica = replica
        path = check_model_file(spec.path)
        self.path = path
        top_k = _option(spec, "top_k", int, int(_SAMPLING_DEFAULTS["top_k"]), low=0)
        top_p = _option(spec, "top_p", float, _SAMPLING_DEFAULTS["top_p"], low=0.0, high=1.0)
        min_p = _option(spec, "min_p", float, _SAMPLING_DEFAULTS["min_p"], low=0.0, high=1.0)
        self._sampling = (top_k, top_p, min_p)
        #: Sequences decoded together, and the context length of each (prompt + max_tokens).
        self.slots: int = spec.slots
        self.n_ctx: int = spec.n_ctx
        n_batch = max(self.slots, _option(spec, "n_batch", int, 512, low=1))
        #: Prompt tokens prefilled per step, across every sequence still reading its prompt.
        self.prefill_chunk: int = _option(spec, "prefill_chunk", int, 256, low=1)
        n_threads_batch = _option(spec, "n_threads_batch", int, spec.n_threads, low=1)
        flash_attn = spec.options.get("flash_attn", "auto")
        if not (flash_attn == "auto" or isinstance(flash_attn, bool)):
            raise ConfigError(
                f"must be true, false or 'auto', got {flash_attn!r}",
                key=f"models.{spec.name}.options.flash_attn",
            )
        pooling_name = _option(spec, "pooling", str, "model")
        if pooling_name != "model" and pooling_name not in _POOLING:
            raise ConfigError(
                f"unknown pooling {pooling_name!r}; expected 'model' or one of {sorted(_POOLING)}",
                key=f"models.{spec.name}.options.pooling",
            )
        kv_cells = spec.n_ctx * spec.slots
        if kv_cells > _MAX_KV_CELLS:
            raise ConfigError(
                f"n_ctx x slots is {kv_cells} KV cells; llama.cpp takes at most {_MAX_KV_CELLS}",
                key=f"models.{spec.name}.slots",
            )
        use_mmap = _option(spec, "use_mmap", bool, True)
        gguf_check = _option(spec, "gguf_check", bool, True)
        probe = _option(spec, "probe", bool, True)
        probe_timeout_s = _option(spec, "probe_timeout_s", float, 300.0, low=0.01)
        if gguf_check:
            check_gguf(path)
        try:
            lib = _llama()
        except (ImportError, OSError, RuntimeError) as exc:
            # llama-cpp-python raises RuntimeError or FileNotFoundError, not ImportError, when
            # its shared library is missing or will not load (a CUDA wheel on a host without CUDA).
            raise ModelLoadError(
                f"the llama_cpp backend needs a working llama-cpp-python ({exc})", path=str(path)
            ) from exc
        if probe:
            request = ProbeRequest.for_spec(
                spec, path, pooling=pooling_name, use_mmap=use_mmap, gguf_check=gguf_check
            )
            verify(request, llama_version=str(lib.__version__), timeout_s=probe_timeout_s)
        self._lib = lib
        self._lock = threading.Lock()
        self._closed = False
        # Embeddings-only models get a context created in embeddings mode; the others switch
        # into it per embed() call when they serve Kind.EMBED at all.
        self._embeddings_only = spec.kinds == frozenset({Kind.EMBED})

        t0 = time.perf_counter()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if spec.n_gpu_layers == -1 else spec.n_gpu_layers
        mparams.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        if spec.device is not None:
            mparams.split_mode = lib.LLAMA_SPLIT_MODE_NONE
            mparams.main_gpu = spec.device
        with _capturing_native_errors() as errors:
            model = lib.llama_model_load_from_file(os.fsencode(path), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load it: {_reason(errors)}", path=str(path))
        self._model = model
        self._ctx: Any = None
        try:
            cparams = lib.llama_context_default_params()
            # One unified KV buffer of n_ctx cells per slot (see the module docstring).
            cparams.n_ctx = kv_cells
            # llama.cpp aborts the process building a pooling graph for a context whose
            # sequence count is not a power of two (GGML_ASSERT in build_pooling, seen with 3,
            # 5, 6, 7 and 12), so a context that may embed gets the next power of two; the
            # ids past `slots` are never used.
            cparams.n_seq_max = self.slots
            if Kind.EMBED in spec.kinds:
                cparams.n_seq_max = 1 << (self.slots - 1).bit_length()
            cparams.kv_unified = True
            cparams.n_batch = cparams.n_ubatch = n_batch
            cparams.n_threads = spec.n_threads
            cparams.n_threads_batch = n_threads_batch
            cparams.embeddings = self._embeddings_only
            cparams.no_perf = True
            cparams.flash_attn_type = _FLASH_ATTN[flash_attn]
            if pooling_name != "model":
                cparams.pooling_type = _POOLING[pooling_name]
            with _capturing_native_errors() as errors:
                ctx = lib.llama_init_from_model(model, cparams)
            if not ctx:
                raise ModelLoadError(
                    f"llama.cpp could not create a context (n_ctx={spec.n_ctx}, "
                    f"slots={self.slots}): {_reason(errors)}",
                    path=str(path),
                )
            self._ctx = ctx
            if lib.llama_n_ctx(ctx) < kv_cells or lib.llama_n_seq_max(ctx) < self.slots:
                raise ModelLoadError(
                    f"llama.cpp made a context of {lib.llama_n_ctx(ctx)} cells for "
                    f"{lib.llama_n_seq_max(ctx)} sequences; {kv_cells} for {self.slots} needed",
                    path=str(path),
                )
            self._vocab = lib.llama_model_get_vocab(model)
            self._mem = lib.llama_get_memory(ctx)
            self.n_batch: int = lib.llama_n_batch(ctx)
            self.n_embd: int = lib.llama_model_n_embd(model)
            self.pooling: int = lib.llama_pooling_type(ctx)
            if self.pooling == lib.LLAMA_POOLING_TYPE_RANK and Kind.EMBED in spec.kinds:
                raise ModelLoadError(
                    "the model pools by rank (a reranker: one score per text, not a vector), so "
                    "it cannot serve embeddings; set options.pooling to override",
                    path=str(path),
                )
            # The beginning-of-sequence token every prompt starts with is no prefix worth
            # reusing on its own.
            self._n_bos = 1 if lib.llama_vocab_get_add_bos(self._vocab) else 0
            self._template = self._chat_template()
        except BaseException:
            self._free()
            raise
        self._pieces: dict[int, bytes] = {}
        self._control_text: ControlText | None = None
        #: Grammars built from JSON schemas, by the schema's JSON text (most recent last).
        self._grammars: dict[str, str] = {}
        self._slots = [_Slot(i) for i in range(self.slots)]
        #: Admitted sequences by key, in admission order (prefill is first come, first served).
        self._seqs: dict[int, _Sequence] = {}
        self._ended = 0
        #: Admissions that reused a cached prompt prefix, and the prompt tokens they skipped.
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0
        self._init_batch(n_batch)
        log.info(
            "model_loaded",
            model=spec.name,
            replica=replica,
            path=str(path),
            n_ctx=self.n_ctx,
            slots=self.slots,
            n_embd=self.n_embd,
            load_s=round(time.perf_counter() - t0, 4),
        )

    def _init_batch(self, capacity: int) -> None:
        """One ``llama_batch`` for every decode, over arrays this object owns: a step fills them
        with a few vectorised slice assignments instead of a ctypes store per field per token."""
        lib = self._lib
        self._b_token = np.zeros(capacity, dtype=np.int32)
        self._b_pos = np.zeros(capacity, dtype=np.int32)
        self._b_n_seq = np.ones(capacity, dtype=np.int32)
        self._b_logits = np.zeros(capacity, dtype=np.int8)
        self._b_seq = np.zeros(capacity, dtype=np.uintp)
        # Every token belongs to one sequence: its seq_id entry points at that id in this array.
        self._seq_ids = np.arange(self.slots, dtype=np.int32)
        self._seq_id_ptrs = self._seq_ids.ctypes.data + self._seq_ids.itemsize * np.arange(
            self.slots, dtype=np.uintp
        )
        batch = lib.llama_batch()
        batch.token = self._b_token.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        batch.pos = self._b_pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        batch.n_seq_id = self._b_n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(
            self._b_seq.ctypes.data, ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id))
        )
        batch.logits = self._b_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = batch

    # -- BatchBackend protocol ----------------------------------------------------------------

    def admit(self, seq: int, params: CompletionParams, on_token: TokenCallback | None) -> None:
        """Take a completion into the free slot whose cached tokens share the longest prefix
        with its prompt; the following steps prefill the rest and decode it.

        ``on_token`` gets each non-empty piece of new text (a character split across tokens
        arrives whole, once). Returning ``False`` from it stops the sequence at once with
        finish reason ``"cancelled"``. Text that could be the start of a stop string is held
        back until it is known not to be one.

        Raises:
            InvalidRequestError: the prompt and ``max_tokens`` do not fit a slot's ``n_ctx``,
                the model only embeds, or a value is malformed; nothing changed.
            BackendError: no slot is free, or ``seq`` is already admitted.
        """
        with self._entered():
            self._admit(seq, params, on_token)

    def step(self) -> list[tuple[int, Completion]]:
        """One ``llama_decode`` over every admitted sequence: one token for each one decoding,
        and up to ``prefill_chunk`` prompt tokens for those still reading their prompt. Returns
        the sequences that ended (their slots are free again).

        Raises:
            BackendError: llama.cpp failed to decode; every sequence was dropped and the KV
                cache cleared, the context is usable.
            Exception: what an ``on_token`` callback raised; its sequence was dropped, the
                others go on.
        """
        with self._entered():
            return self._step()

    def cancel(self, seq: int) -> None:
        """Drop sequence ``seq`` and free its slot (its KV cells stay, as a reusable prefix).
        Unknown keys, and a closed context, are ignored."""
        with self._entered(closed_ok=True):
            s = self._seqs.pop(seq, None)
            if s is not None:
                self._release(s)

    def complete(
        self, params: CompletionParams, on_token: TokenCallback | None = None
    ) -> Completion:
        """Generate up to ``params.max_tokens`` tokens for one prompt, alone (admit, then step
        until it ends); for the load probe and tests. See :meth:`admit`.

        Raises:
            InvalidRequestError: see :meth:`admit`.
            BackendError: llama.cpp failed to decode, or the context is in use or closed.
        """
        return run_alone(self, params, on_token)

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Return one pooled, L2-normalised vector per text, between steps.

        Texts are decoded several at a time, each under the sequence id of a free slot (that
        slot's cached prefix is forgotten), as many as fit one batch; running sequences keep
        their KV cells. Pooling is the model's own (the ladder's models use mean); a model
        without one is mean-pooled here. A text longer than a slot's context or the batch size
        (``options.n_batch``, 512 by default) is truncated to it, as a pooled sequence must be
        decoded in one batch.

        Raises:
            InvalidRequestError: a text encodes to no tokens at all, or is not a string.
            BackendError: no slot is free, or llama.cpp failed to decode.
        """
        with self._entered():
            return self._embed(texts)

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to, without the beginning-of-sequence token."""
        with self._entered():
            return len(self._tokenize(text, add_special=False))

    def close(self) -> None:
        """Free the context and the model; waits for a call in progress. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for s in self._seqs.values():
                self._lib.llama_sampler_free(s.sampler)
            self._seqs.clear()
            self._free()
        log.info("model_closed", model=self.spec.name, replica=self.replica)

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _entered(self, *, closed_ok: bool = False) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise BackendError(
                f"model {self.spec.name!r} replica {self.replica}: context entered from two "
                "threads at once"
            )
        try:
            if self._closed and not closed_ok:
                raise BackendError(f"model {self.spec.name!r} replica {self.replica} is closed")
            yield
        finally:
            self._lock.release()

    def _free(self) -> None:
        lib = self._lib
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def _chat_template(self) -> ChatTemplate:
        """The model's chat template (the ChatML fallback if its file has none)."""
        lib, name = self._lib, self.spec.name
        key = b"tokenizer.chat_template"
        n = lib.llama_model_meta_val_str(self._model, key, None, 0)
        if n < 0:
            source, error = None, None
        else:
            buf = ctypes.create_string_buffer(n + 1)
            lib.llama_model_meta_val_str(self._model, key, buf, n + 1)
            try:
                source, error = buf.raw[:n].decode("utf-8"), None
            except UnicodeDecodeError:
                source, error = "", "tokenizer.chat_template is not valid UTF-8"

        def text(token: int) -> str:
            if token < 0:
                return ""
            buf = ctypes.create_string_buffer(256)
            n = lib.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
            return buf.raw[: max(n, 0)].decode("utf-8", "replace")

        bos = text(lib.llama_vocab_bos(self._vocab))
        eos = text(lib.llama_vocab_eos(self._vocab))
        self._bos_text = bos
        return ChatTemplate(source, model=name, bos_token=bos, eos_token=eos, error=error)

    def _controls(self) -> ControlText:
        """The texts of the vocabulary's control tokens (found on first use)."""
        if self._control_text is None:
            lib, vocab = self._lib, self._vocab
            special = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_UNKNOWN
            texts = []
            for token in range(lib.llama_vocab_n_tokens(vocab)):
                if lib.llama_vocab_get_attr(vocab, token) & special:
                    raw = lib.llama_vocab_get_text(vocab, token)
                    if raw:
                        texts.append(raw.decode("utf-8", "replace"))
            self._control_text = ControlText(texts)
        return self._control_text

    def _grammar(self, schema: Any) -> str:
        """The GBNF grammar of a JSON schema (cached).

        Raises:
            InvalidRequestError: llama-cpp-python cannot convert the schema.
        """
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.pop(key, None)
        if grammar is None:
            try:
                grammar = json_schema_grammar(schema)
            except Exception as exc:  # its converter raises plain exceptions of several types
                raise InvalidRequestError(
                    f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}"
                ) from None
            if len(self._grammars) >= _GRAMMAR_CACHE:
                del self._grammars[next(iter(self._grammars))]
        self._grammars[key] = grammar
        return grammar

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; control tokens spelled in it are parsed only if
        ``parse_special`` (a rendered chat template's turn markers).

        Raises:
            InvalidRequestError: ``text`` is not a string, is not valid Unicode (a lone
                surrogate), or is too long for llama.cpp to tokenize.
        """
        lib = self._lib
        data = _utf8(text)
        capacity = len(data) + 8
        for _ in range(2):
            buf = (lib.llama_token * capacity)()
            # A plain prompt must not be able to inject control tokens: parse_special is off.
            n = lib.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):  # llama.cpp: the result would not fit an int32
                break
            capacity = -n
        raise InvalidRequestError(
            f"model {self.spec.name!r} cannot tokenize a text of {len(data)} bytes"
        )

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def _forget(self, slot: _Slot, keep: int = 0) -> int:
        """Drop ``slot``'s KV cells from position ``keep`` on; returns the tokens kept."""
        if keep < len(slot.cached):
            if self._mem and not self._lib.llama_memory_seq_rm(self._mem, slot.id, keep, -1):
                # Memory that cannot drop part of a sequence (a recurrent model) drops it all.
                self._lib.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
                keep = 0
            del slot.cached[keep:]
        return keep

    def _clear(self, slot: _Slot) -> None:
        """Drop every KV cell of ``slot``'s sequence id."""
        if self._mem:
            self._lib.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.cached.clear()

    def _sampler(self, params: CompletionParams) -> Any:
        lib = self._lib
        grammar = None
        if params.chat is not None and params.chat.json_schema is not None:
            grammar = self._grammar(params.chat.json_schema).encode()
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            if grammar is not None:
                with _capturing_native_errors() as errors:
                    constrained = lib.llama_sampler_init_grammar(self._vocab, grammar, b"root")
                if not constrained:
                    raise InvalidRequestError(
                        f"llama.cpp refused the grammar of the JSON schema: {_reason(errors)}"
                    )
                lib.llama_sampler_chain_add(chain, constrained)
            if params.temperature <= 0.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            else:
                top_k, top_p, min_p = self._sampling
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(top_k))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(min_p, 1))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
                seed = params.seed & 0xFFFFFFFF
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        except BaseException:
            lib.llama_sampler_free(chain)  # frees the samplers already added too
            raise
        return chain

    def _admit(self, key: int, params: CompletionParams, on_token: TokenCallback | None) -> None:
        start = time.perf_counter()
        name = self.spec.name
        if self._embeddings_only:
            raise InvalidRequestError(f"model {name!r} serves embeddings only")
        _check_params(params)
        if params.chat is None:
            prompt = self._tokenize(params.prompt, add_special=True)
        else:
            # Control-token text the caller wrote is shielded from the template and tokenized
            # as plain text: a message cannot forge a turn (see ControlText).
            data, found = self._controls().shield((params.chat.messages, params.chat.tools))
            text = self._template.render(*data)
            # A template that writes the BOS token itself must not get a second one.
            bos_text = self._bos_text
            add_special = not (bos_text and text.startswith(bos_text))
            if not found:
                prompt = self._tokenize(text, add_special=add_special, parse_special=True)
            else:
                prompt = []
                for i, (piece, markup) in enumerate(ControlText.pieces(text, found)):
                    prompt += self._tokenize(
                        piece, add_special=add_special and i == 0, parse_special=markup
                    )
        if not prompt:
            raise InvalidRequestError("the prompt encodes to no tokens")
        if params.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.n_ctx:
            raise ContextWindowExceeded(
                f"prompt is {len(prompt)} tokens and max_tokens {params.max_tokens}; model "
                f"{name!r} has a context of {self.n_ctx} tokens per request",
                model=name,
                n_ctx=self.n_ctx,
                prompt_tokens=len(prompt),
                max_tokens=params.max_tokens,
            )
        if key in self._seqs:
            raise BackendError(f"model {name!r}: sequence {key} is already admitted")
        free = [slot for slot in self._slots if slot.seq is None]
        if not free:
            raise BackendError(f"model {name!r}: all {self.slots} slots are taken")
        bos = self._n_bos

        def score(slot: _Slot) -> tuple[int, bool, int]:
            # Longest shared prefix first (the BOS token alone does not count); else an empty
            # slot, else the least recently used one, so good caches survive longest.
            shared = _common_prefix(slot.cached, prompt)
            return (shared if shared > bos else 0, not slot.cached, -slot.used_at)

        slot = max(free, key=score)
        sampler = self._sampler(params)
        # Re-decode at least the prompt's last token: its logits give the first new token.
        keep = self._forget(slot, min(_common_prefix(slot.cached, prompt), len(prompt) - 1))
        if keep > bos:
            self.prefix_hits += 1
            self.prefix_tokens_reused += keep
        s = _Sequence(key, slot, params, on_token, prompt, sampler, start)
        slot.seq = s
        self._seqs[key] = s

    def _release(self, s: _Sequence) -> None:
        """Free ``s``'s sampler and slot; its KV cells stay as that slot's cached prefix."""
        self._lib.llama_sampler_free(s.sampler)
        self._ended += 1
        s.slot.seq = None
        s.slot.used_at = self._ended

    def _step(self) -> list[tuple[int, Completion]]:
        seqs = self._seqs
        if not seqs:
            return []
        lib = self._lib
        tokens: list[int] = []
        positions: list[int] = []
        ids: list[int] = []
        sampled: list[_Sequence] = []  # sequences with logits in this batch, in batch order
        for s in seqs.values():
            if s.next_token >= 0:
                s.logit_idx = len(tokens)
                tokens.append(s.next_token)
                positions.append(len(s.slot.cached))
                ids.append(s.slot.id)
                sampled.append(s)
        decoding = len(tokens)
        room = min(self.prefill_chunk, self.n_batch - decoding)
        prefilled: list[tuple[_Sequence, int]] = []
        for s in seqs.values():
            if room <= 0:
                break
            left = len(s.prompt) - s.fed
            if s.next_token >= 0 or left <= 0:
                continue
            take = min(room, left)
            room -= take
            at = len(tokens)
            tokens += s.prompt[s.fed : s.fed + take]
            positions += range(s.fed, s.fed + take)
            ids += [s.slot.id] * take
            prefilled.append((s, take))
            if take == left:  # the prompt's last token: its logits give the first new token
                s.logit_idx = at + take - 1
                sampled.append(s)
        n = len(tokens)
        if n == 0:
            return []
        self._b_token[:n] = tokens
        self._b_pos[:n] = positions
        self._b_seq[:n] = self._seq_id_ptrs[ids]
        logits = self._b_logits
        logits[:n] = 0
        logits[[s.logit_idx for s in sampled]] = 1
        self._batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            dropped = len(seqs)
            self._drop_all()
            raise BackendError(
                f"model {self.spec.name!r}: llama_decode failed ({rc}); {dropped} sequences dropped"
            )
        for s in sampled[:decoding]:
            s.slot.cached.append(s.next_token)
            s.next_token = -1
        for s, take in prefilled:
            s.slot.cached += s.prompt[s.fed : s.fed + take]
            s.fed += take
        ended: list[tuple[int, Completion]] = []
        for i, s in enumerate(sampled):
            try:
                finish = self._accept(
                    s, lib.llama_sampler_sample(s.sampler, self._ctx, s.logit_idx)
                )
                if finish is not None:
                    del seqs[s.key]
                    ended.append((s.key, self._finish(s, finish)))
            except BaseException:
                # An on_token callback raised: that sequence is dropped, and the ones not yet
                # sampled take their last token back, to be decoded again next step.
                self._rewind(sampled[i + 1 :])
                if seqs.pop(s.key, None) is not None:
                    self._release(s)
                raise
        return ended

    def _accept(self, s: _Sequence, token: int) -> str | None:
        """Account for ``token`` sampled for ``s``; return a finish reason if ``s`` ended."""
        if s.n_out == 0:
            s.first_token_s = time.perf_counter() - s.start
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            return "stop"
        s.n_out += 1
        s.pending += s.decoder.decode(self._piece(token))
        emit = s.pending
        finish = None
        if s.stops:
            pending = s.pending
            cut = min((i for stop in s.stops if (i := pending.find(stop)) >= 0), default=-1)
            if cut >= 0:
                emit, s.pending, finish = pending[:cut], "", "stop"
                s.at_stop_string = True
            else:
                cut = len(pending) - _held_back(pending, s.stops, s.longest_stop)
                emit, s.pending = pending[:cut], pending[cut:]
        else:
            s.pending = ""
        if emit:
            s.out.append(emit)
            if s.on_token is not None and s.on_token(emit) is False:
                return "cancelled"
        if finish is not None:
            return finish
        if s.n_out >= s.budget:
            return "length"
        s.next_token = token
        return None

    def _finish(self, s: _Sequence, finish: str) -> Completion:
        """Release ``s``'s slot and build its result."""
        self._release(s)
        # Text held back as a possible stop-string start is final unless a stop string cut it:
        # an end-of-generation token ends the text as surely as the length limit does.
        if not s.at_stop_string:
            tail = s.pending + s.decoder.decode(b"", final=True)
            if tail:
                s.out.append(tail)
                if finish != "cancelled" and s.on_token is not None:
                    s.on_token(tail)
        return Completion(
            text="".join(s.out),
            prompt_tokens=len(s.prompt),
            completion_tokens=s.n_out,
            finish_reason=finish,
            first_token_s=s.first_token_s,
            service_s=time.perf_counter() - s.start,
        )

    def _rewind(self, pending: Sequence[_Sequence]) -> None:
        """Take back the token each of ``pending`` decoded last (their logits were never
        sampled), so the next step decodes it again."""
        for s in pending:
            slot = s.slot
            token, last = slot.cached[-1], len(slot.cached) - 1
            if self._forget(slot, last) < last:  # could not drop one cell: drop the sequence
                del self._seqs[s.key]
                self._release(s)
            elif s.n_out == 0:  # it had just read its whole prompt
                s.fed = last
            else:
                s.next_token = token

    def _drop_all(self) -> None:
        """After a failed decode: every sequence dropped, the KV cache cleared."""
        if self._mem:
            self._lib.llama_memory_clear(self._mem, True)
        for s in self._seqs.values():
            self._release(s)
        self._seqs.clear()
        for slot in self._slots:
            slot.cached.clear()

    def _embed(self, texts: Sequence[str]) -> Embedding:
        t0 = time.perf_counter()
        if isinstance(texts, str):
            raise InvalidRequestError("embed() takes a sequence of texts, not one string")
        lib = self._lib
        if self.pooling == lib.LLAMA_POOLING_TYPE_RANK:
            # llama.cpp's per-sequence output is then n_cls_out scores, not n_embd floats.
            raise InvalidRequestError(f"model {self.spec.name!r} is a reranker; it cannot embed")
        try:
            texts = list(texts)
        except TypeError:
            raise InvalidRequestError(
                f"embed() takes a sequence of texts, not {type(texts).__name__}"
            ) from None
        for text in texts:
            _utf8(text)  # refuse a bad text before anything is tokenized
        cap = min(self.n_batch, self.n_ctx)
        encoded: list[list[int]] = []
        for text in texts:
            tokens = self._tokenize(text, add_special=True)[:cap]
            if not tokens:
                raise InvalidRequestError("a text to embed encodes to no tokens")
            encoded.append(tokens)
        vectors: list[list[float]] = []
        if not encoded:
            return Embedding(vectors=[], prompt_tokens=0, service_s=time.perf_counter() - t0)
        # Empty slots first, then the least recently used: their cached prefixes are lost.
        free = sorted(
            (slot for slot in self._slots if slot.seq is None),
            key=lambda slot: (bool(slot.cached), slot.used_at),
        )
        if not free:
            raise BackendError(f"model {self.spec.name!r}: no free slot to embed in")
        if not self._embeddings_only:
            lib.llama_set_embeddings(self._ctx, True)
        try:
            i = 0
            while i < len(encoded):
                group: list[list[int]] = []
                size = 0
                while (
                    i < len(encoded)
                    and len(group) < len(free)
                    and size + len(encoded[i]) <= self.n_batch
                ):
                    group.append(encoded[i])
                    size += len(encoded[i])
                    i += 1
                vectors += self._embed_group(group, free[: len(group)])
        finally:
            if not self._embeddings_only:
                lib.llama_set_embeddings(self._ctx, False)
        return Embedding(
            vectors=vectors,
            prompt_tokens=sum(map(len, encoded)),
            service_s=time.perf_counter() - t0,
        )

    def _embed_group(self, group: list[list[int]], slots: list[_Slot]) -> list[list[float]]:
        """Decode ``group`` in one batch (so one ubatch: pooling needs each text whole), text
        ``j`` as the sequence of ``slots[j]``; the slots' KV cells are cleared before and after."""
        lib = self._lib
        for slot in slots:
            self._clear(slot)
        n = sum(map(len, group))
        self._b_token[:n] = [t for tokens in group for t in tokens]
        self._b_pos[:n] = [p for tokens in group for p in range(len(tokens))]
        self._b_seq[:n] = np.repeat(
            self._seq_id_ptrs[[slot.id for slot in slots]], [len(t) for t in group]
        )
        self._b_logits[:n] = 1  # every token is an output: pooling reads them all
        self._batch.n_tokens = n
        try:
            rc = lib.llama_decode(self._ctx, self._batch)
            if rc != 0:
                raise BackendError(
                    f"model {self.spec.name!r}: llama_decode failed ({rc}) embedding"
                )
            vectors: list[list[float]] = []
            if self.pooling == lib.LLAMA_POOLING_TYPE_NONE:
                ptr = lib.llama_get_embeddings(self._ctx)
                if not ptr:
                    raise BackendError(
                        f"model {self.spec.name!r}: llama.cpp returned no embeddings"
                    )
                per_token = np.ctypeslib.as_array(ptr, (n, self.n_embd))
                at = 0
                for tokens in group:
                    rows = per_token[at : at + len(tokens)]
                    vectors.append(_unit(rows.mean(axis=0, dtype=np.float64)))
                    at += len(tokens)
            else:
                for slot in slots:
                    ptr = lib.llama_get_embeddings_seq(self._ctx, slot.id)
                    if not ptr:
                        raise BackendError(
                            f"model {self.spec.name!r}: llama.cpp returned no embedding"
                        )
                    vec = np.ctypeslib.as_array(ptr, (self.n_embd,)).astype(np.float64)
                    vectors.append(_unit(vec))
            return vectors
        finally:
            for slot in slots:
                self._clear(slot)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _unit(vec: Any) -> list[float]:
    """``vec`` scaled to unit L2 norm (left as is if zero), as a list."""
    norm = float(np.linalg.norm(vec))
    if norm > 0.0:
        vec = vec / norm
    result: list[float] = vec.tolist()
    return result


def _utf8(text: object) -> bytes:
    """``text`` as UTF-8 bytes for llama.cpp, or :class:`~zeta.InvalidRequestError`."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"a text must be a string, not {type(text).__name__}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"text is not valid Unicode: {exc.reason} at character {exc.start} "
            f"({text[exc.start : exc.end]!a})"
        ) from None
    if len(data) > _MAX_TEXT_BYTES:
        raise InvalidRequestError(f"a text of {len(data)} bytes is too long to tokenize")
    return data


def _check_params(params: CompletionParams) -> None:
    """Refuse completion parameters llama.cpp would misbehave on, before the context is used."""
    temperature = params.temperature
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
    ):
        raise InvalidRequestError(f"temperature must be a finite number, got {temperature!r}")
    for name in ("max_tokens", "seed"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
    if isinstance(params.stop, str) or not all(isinstance(s, str) for s in params.stop):
        raise InvalidRequestError("stop must be a sequence of strings")


def _held_back(text: str, stops: tuple[str, ...], longest: int) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def _reason(errors: list[str]) -> str:
    if not errors:
        return "no reason given (see the zeta.backends.llama_cpp.native log)"
    return "; ".join(errors[-3:])


def open_backend(spec: ModelSpec, replica: int) -> LlamaCppBackend:
    """Open one llama.cpp context for ``spec`` (blocks; raises :class:`~zeta.ModelLoadError`)."""
    return LlamaCppBackend(spec, replica)
