"""The llama.cpp backend: one llama.cpp context per actor, on llama-cpp-python's C bindings.

It drives the ``llama_cpp`` C API directly rather than the high-level ``llama_cpp.Llama`` class,
for three reasons:

* ``Llama(verbose=False)`` silences llama.cpp by ``dup2``-ing the process's stdout and stderr to
  ``/dev/null`` while it loads. File descriptors are process-wide, so two replicas loading at
  once, or the event loop printing meanwhile, can lose output or leave stderr pointing at
  ``/dev/null`` for good. Here llama.cpp's log goes through :func:`llama_cpp.llama_log_set` into
  zeta's logging instead, and nothing is printed.
* Token accounting must be exact: the router's per-token cost estimate is fed from it. This
  loop samples, counts and decodes one token at a time, turns bytes into text with an
  incremental UTF-8 decoder (a character split across tokens is emitted once whole), and never
  returns more than ``max_tokens`` tokens.
* One context serves both completions and embeddings: :meth:`LlamaCppBackend.embed` switches the
  context into embeddings mode for the call (``llama_set_embeddings``) and back, so a model that
  serves several kinds costs one context, not two.

``llama_cpp`` is imported on first use, so importing zeta never needs it.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._exceptions import BackendError, ConfigError, InvalidRequestError, ModelLoadError
from .._types import Kind, ModelSpec
from ..telemetry._logging import get_logger
from ._base import Completion, CompletionParams, Embedding, TokenCallback

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
    a directory, an empty or truncated file, a wrong magic, an unknown version. Damage further
    in (a truncated tensor section) is left to llama.cpp's loader, which reports it cleanly.

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


class LlamaCppBackend:
    """One llama.cpp context for one replica of a model.

    Every method blocks. The owning actor calls them from one worker thread at a time; a second
    thread entering while a call runs gets :class:`~zeta.BackendError` instead of the abort
    llama.cpp would give it. The KV cache keeps the last prompt and completion, so a request
    sharing a prefix with the previous one (a system prompt, an agent's growing transcript)
    decodes only the new tokens.
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
        n_batch = min(spec.n_ctx, _option(spec, "n_batch", int, 512, low=1))
        n_threads_batch = _option(spec, "n_threads_batch", int, spec.n_threads, low=1)
        pooling_name = _option(spec, "pooling", str, "model")
        if pooling_name != "model" and pooling_name not in _POOLING:
            raise ConfigError(
                f"unknown pooling {pooling_name!r}; expected 'model' or one of {sorted(_POOLING)}",
                key=f"models.{spec.name}.options.pooling",
            )
        use_mmap = _option(spec, "use_mmap", bool, True)
        try:
            lib = _llama()
        except (ImportError, OSError, RuntimeError) as exc:
            # llama-cpp-python raises RuntimeError or FileNotFoundError, not ImportError, when
            # its shared library is missing or will not load (a CUDA wheel on a host without CUDA).
            raise ModelLoadError(
                f"the llama_cpp backend needs a working llama-cpp-python ({exc})", path=str(path)
            ) from exc
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
        self._batch: Any = None
        try:
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = spec.n_ctx
            cparams.n_batch = cparams.n_ubatch = n_batch
            cparams.n_seq_max = 1
            cparams.n_threads = spec.n_threads
            cparams.n_threads_batch = n_threads_batch
            cparams.embeddings = self._embeddings_only
            cparams.no_perf = True
            if pooling_name != "model":
                cparams.pooling_type = _POOLING[pooling_name]
            with _capturing_native_errors() as errors:
                ctx = lib.llama_init_from_model(model, cparams)
            if not ctx:
                raise ModelLoadError(
                    f"llama.cpp could not create a context (n_ctx={spec.n_ctx}): {_reason(errors)}",
                    path=str(path),
                )
            self._ctx = ctx
            self._vocab = lib.llama_model_get_vocab(model)
            self._mem = lib.llama_get_memory(ctx)
            self.n_ctx: int = lib.llama_n_ctx(ctx)
            self.n_batch: int = lib.llama_n_batch(ctx)
            self.n_embd: int = lib.llama_model_n_embd(model)
            self.pooling: int = lib.llama_pooling_type(ctx)
            if self.pooling == lib.LLAMA_POOLING_TYPE_RANK and Kind.EMBED in spec.kinds:
                raise ModelLoadError(
                    "the model pools by rank (a reranker: one score per text, not a vector), so "
                    "it cannot serve embeddings; set options.pooling to override",
                    path=str(path),
                )
            self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        except BaseException:
            self._free()
            raise
        self._one = (lib.llama_token * 1)()
        self._pieces: dict[int, bytes] = {}
        # Tokens whose keys and values are in the KV cache, in order (sequence 0).
        self._cached: list[int] = []
        log.info(
            "model_loaded",
            model=spec.name,
            replica=replica,
            path=str(path),
            n_ctx=self.n_ctx,
            n_embd=self.n_embd,
            load_s=round(time.perf_counter() - t0, 4),
        )

    # -- Backend protocol ---------------------------------------------------------------------

    def complete(
        self, params: CompletionParams, on_token: TokenCallback | None = None
    ) -> Completion:
        """Generate up to ``params.max_tokens`` tokens, streaming text pieces to ``on_token``.

        ``on_token`` gets each non-empty piece of new text (a character split across tokens
        arrives whole, once). Returning ``False`` from it stops generation at once with finish
        reason ``"cancelled"``; the context is left consistent for the next request. Text that
        could be the start of a stop string is held back until it is known not to be one.

        Raises:
            InvalidRequestError: the prompt does not fit the context, or the model only embeds.
            BackendError: llama.cpp failed to decode.
        """
        with self._entered():
            return self._complete(params, on_token)

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Return one pooled, L2-normalised vector per text.

        Pooling is the model's own (the ladder's models use mean); a model without one is
        mean-pooled here. Texts longer than the batch size (``options.n_batch``, 512 by
        default) are truncated to it, as a pooled sequence must be decoded in one batch.

        Raises:
            InvalidRequestError: a text encodes to no tokens at all.
            BackendError: llama.cpp failed to decode.
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
            self._free()
        log.info("model_closed", model=self.spec.name, replica=self.replica)

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise BackendError(
                f"model {self.spec.name!r} replica {self.replica}: context entered from two "
                "threads at once"
            )
        try:
            if self._closed:
                raise BackendError(f"model {self.spec.name!r} replica {self.replica} is closed")
            yield
        finally:
            self._lock.release()

    def _free(self) -> None:
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lib.llama_model_free(self._model)
            self._model = None

    def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        lib = self._lib
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            buf = (lib.llama_token * capacity)()
            # parse_special=False: a prompt must not be able to inject control tokens.
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, False)
            if n >= 0:
                return buf[:n]
            capacity = -n
        raise BackendError(f"model {self.spec.name!r}: tokenizer failed ({n})")

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

    def _decode_tokens(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` after the cached ones; logits come out for the last one only."""
        lib = self._lib
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            if len(chunk) == 1:
                arr = self._one
                arr[0] = chunk[0]
            else:
                arr = (lib.llama_token * len(chunk))(*chunk)
            rc = lib.llama_decode(self._ctx, lib.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                self._reset_cache()
                raise BackendError(f"model {self.spec.name!r}: llama_decode failed ({rc})")
            self._cached.extend(chunk)

    def _reset_cache(self) -> None:
        self._lib.llama_memory_clear(self._mem, True)
        self._cached.clear()

    def _prefill(self, prompt: list[int]) -> None:
        """Bring the KV cache to ``prompt``, reusing the longest prefix already cached."""
        keep = 0
        for a, b in zip(self._cached, prompt, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # re-decode at least one token to get fresh logits
        if keep < len(self._cached):
            if self._lib.llama_memory_seq_rm(self._mem, 0, keep, -1):
                del self._cached[keep:]
            else:
                self._reset_cache()
                keep = 0
        self._decode_tokens(prompt[keep:])

    def _sampler(self, params: CompletionParams) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
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

    def _complete(self, params: CompletionParams, on_token: TokenCallback | None) -> Completion:
        t0 = time.perf_counter()
        if self._embeddings_only:
            raise InvalidRequestError(f"model {self.spec.name!r} serves embeddings only")
        lib = self._lib
        prompt = self._tokenize(params.prompt, add_special=True)
        if not prompt:
            raise InvalidRequestError("the prompt encodes to no tokens")
        if len(prompt) >= self.n_ctx:
            raise InvalidRequestError(
                f"prompt is {len(prompt)} tokens; model {self.spec.name!r} has a context of "
                f"{self.n_ctx}"
            )
        budget = min(params.max_tokens, self.n_ctx - len(prompt))
        stops = tuple(s for s in params.stop if s)
        longest_stop = max((len(s) for s in stops), default=0)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out: list[str] = []  # text already handed out (or final)
        pending = ""  # decoded text held back as a possible stop-string start
        n_out = 0
        first_token_s = 0.0
        finish = "length"
        at_stop_string = False
        self._prefill(prompt)
        sampler = self._sampler(params)
        try:
            while n_out < budget:
                token = lib.llama_sampler_sample(sampler, self._ctx, -1)
                if n_out == 0:
                    first_token_s = time.perf_counter() - t0
                if lib.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                n_out += 1
                pending += decoder.decode(self._piece(token))
                emit = pending
                if stops:
                    cut = min((i for s in stops if (i := pending.find(s)) >= 0), default=-1)
                    if cut >= 0:
                        emit, pending, finish = pending[:cut], "", "stop"
                        at_stop_string = True
                    else:
                        cut = len(pending) - _held_back(pending, stops, longest_stop)
                        emit, pending = pending[:cut], pending[cut:]
                else:
                    pending = ""
                if emit:
                    out.append(emit)
                    if on_token is not None and on_token(emit) is False:
                        finish = "cancelled"
                        break
                if finish == "stop":
                    break
                if n_out < budget:
                    self._decode_tokens((token,))
        finally:
            lib.llama_sampler_free(sampler)
        # Text held back as a possible stop-string start is final unless a stop string cut it:
        # an end-of-generation token ends the text as surely as the length limit does.
        if not at_stop_string:
            tail = pending + decoder.decode(b"", final=True)
            if tail:
                out.append(tail)
                if finish != "cancelled" and on_token is not None:
                    on_token(tail)
        return Completion(
            text="".join(out),
            prompt_tokens=len(prompt),
            completion_tokens=n_out,
            finish_reason=finish,
            first_token_s=first_token_s,
            service_s=time.perf_counter() - t0,
        )

    def _embed(self, texts: Sequence[str]) -> Embedding:
        t0 = time.perf_counter()
        if isinstance(texts, str):
            raise InvalidRequestError("embed() takes a sequence of texts, not one string")
        lib = self._lib
        if self.pooling == lib.LLAMA_POOLING_TYPE_RANK:
            # llama.cpp's per-sequence output is then n_cls_out scores, not n_embd floats.
            raise InvalidRequestError(f"model {self.spec.name!r} is a reranker; it cannot embed")
        vectors: list[list[float]] = []
        n_tokens = 0
        if not self._embeddings_only:
            lib.llama_set_embeddings(self._ctx, True)
        try:
            for text in texts:
                tokens = self._tokenize(text, add_special=True)[: self.n_batch]
                if not tokens:
                    raise InvalidRequestError("a text to embed encodes to no tokens")
                n_tokens += len(tokens)
                vectors.append(self._embed_one(tokens))
        finally:
            self._reset_cache()
            if not self._embeddings_only:
                lib.llama_set_embeddings(self._ctx, False)
        return Embedding(
            vectors=vectors, prompt_tokens=n_tokens, service_s=time.perf_counter() - t0
        )

    def _embed_one(self, tokens: list[int]) -> list[float]:
        lib = self._lib
        self._reset_cache()
        batch = self._batch
        n = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1  # every token is an output: pooling reads them all
        batch.n_tokens = n
        rc = lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise BackendError(f"model {self.spec.name!r}: llama_decode failed ({rc}) embedding")
        if self.pooling == lib.LLAMA_POOLING_TYPE_NONE:
            ptr = lib.llama_get_embeddings(self._ctx)
            if not ptr:
                raise BackendError(f"model {self.spec.name!r}: llama.cpp returned no embeddings")
            per_token = np.ctypeslib.as_array(ptr, (n, self.n_embd))
            vec = per_token.mean(axis=0, dtype=np.float64)
        else:
            ptr = lib.llama_get_embeddings_seq(self._ctx, 0)
            if not ptr:
                raise BackendError(f"model {self.spec.name!r}: llama.cpp returned no embedding")
            vec = np.ctypeslib.as_array(ptr, (self.n_embd,)).astype(np.float64)
        norm = float(np.linalg.norm(vec))
        if norm > 0.0:
            vec /= norm
        result: list[float] = vec.tolist()
        return result


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
