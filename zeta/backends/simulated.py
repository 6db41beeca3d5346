"""A simulated backend: blocks a worker thread for a modelled service time, like llama.cpp does.

It batches like the llama.cpp backend: up to ``spec.slots`` completions are decoded together,
one token each per :meth:`~SimulatedBackend.step`. A step takes

    prefill + per_output_token_s * (1 + batch_slope * (B - 1))

where ``B`` is the number of sequences in the step and ``prefill`` the prompt cost of those
still reading their prompt (``base_s`` once, then ``per_prompt_token_s`` per prompt token, in
chunks of ``prefill_chunk`` tokens per step). A sequence produces its first token in the step
that finishes its prompt. With one sequence this is the old single-call service time
``base_s + per_prompt_token_s * prompt_tokens + per_output_token_s * output_tokens``. Each step is
scaled by a seeded jitter factor. Time is spent in :func:`time.sleep` on the calling (worker)
thread, so the scheduler sees exactly the blocking behaviour of a real context. Embeddings are
deterministic vectors derived from a hash of each text.

Chat requests are rendered with the ChatML fallback template (:data:`zeta._chat.CHATML_TEMPLATE`),
in the same sandbox as a real model's. A reply constrained to a JSON schema (``response_format``
or a forced tool call) is a deterministic instance of the schema, as JSON text in pieces of a few
characters, ending ``"stop"`` (or ``"length"`` when ``max_tokens`` cuts it).

Failure injection, for tests of the supervisor, comes from a :class:`FailurePlan` in
``options["failures"]``: each call (a completion's admission, or an embedding) draws one outcome (``"ok"``, ``"error"``, ``"raise"``, ``"die"``,
``"hang"``, ``"midstream"``) from a script and/or probabilities, and each open may fail. A plan object is shared by
every context opened from the spec, so a script runs across restarts; a mapping in its place builds
a fresh plan per context.

Options (all optional):
    base_s, per_prompt_token_s, per_output_token_s: service-time model, seconds (default 0).
    batch_slope: extra step time per extra sequence in a step, relative (default 0.1).
    prefill_chunk: prompt tokens a sequence reads per step (default 512).
    jitter: relative jitter, the factor is uniform in ``[1 - jitter, 1 + jitter]`` (default 0).
    seed: seeds the jitter (mixed with the replica index) and mapping-built failure plans.
    output_tokens: tokens generated per completion, at most ``max_tokens`` (default: max_tokens).
    embed_dim: length of embedding vectors (default 8).
    load_s: time :func:`open_backend` blocks, as if loading weights (default 0).
    gate: a :class:`threading.Event`; every call (an admission or an embedding) waits for it to
        be set before doing anything, so a test can hold a context busy deterministically.
    on_call: ``callable(op, text)`` invoked on the worker thread when a call starts
        (``op`` is ``"complete"`` or ``"embed"``), for tests that trace what ran.
    failures: a :class:`FailurePlan` or a mapping of its fields.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._chat import ChatTemplate, resolve_pointer
from .._exceptions import BackendError, ConfigError, ModelLoadError
from .._types import ModelSpec
from ._base import Completion, CompletionParams, Embedding, TokenCallback, run_alone

__all__ = [
    "OUTCOMES",
    "TRACE_LEN",
    "FailurePlan",
    "SimulatedBackend",
    "SimulatedCrash",
    "open_backend",
]

#: How many recent calls a context remembers in ``SimulatedBackend.calls``.
TRACE_LEN = 1024

#: What one call can do under failure injection.
OUTCOMES = ("ok", "error", "raise", "die", "hang", "midstream")

_WORDS = (
    "the", "model", "routes", "each", "request", "to", "a", "context", "with", "low", "load",
    "and", "returns", "tokens", "in", "order", "while", "others", "wait", "their", "turn",
)  # fmt: skip


class SimulatedCrash(RuntimeError):
    """An injected crash (``"raise"``, ``"die"`` or a hang that gave up).

    Deliberately not a :class:`~zeta.ZetaError`: to the scheduler it is an unexpected failure of
    the context, which is what a segfaulting or wedged llama.cpp context looks like from Python.
    """


def _probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"must be a probability in [0, 1], got {value!r}", key=name)
    return float(value)


@dataclass
class FailurePlan:
    """Which calls (and opens) of a simulated context fail, and how.

    ``script`` is consumed one entry per call, in call order across every context sharing the plan;
    when it runs out, the probabilities apply (``p_error`` + ``p_raise`` + ``p_die`` + ``p_hang``
    must not exceed 1). Likewise ``open_script`` (entries ``"ok"`` or ``"fail"``) and
    ``p_open_fail`` for opens. A ``"hang"`` blocks the worker thread for ``hang_s`` seconds and then
    raises :class:`SimulatedCrash`. Thread-safe: replicas draw from one plan concurrently.

    Outcomes: ``"error"`` raises :class:`~zeta.BackendError` (the call failed, the context is
    fine); ``"raise"`` raises :class:`SimulatedCrash` once; ``"die"`` raises it and leaves the
    context dead, so every later call on it raises too; ``"midstream"`` generates one token and
    then dies (only scripts produce it: a crash after streaming began).
    """

    script: Sequence[str] = ()
    p_error: float = 0.0
    p_raise: float = 0.0
    p_die: float = 0.0
    p_hang: float = 0.0
    hang_s: float = 30.0
    open_script: Sequence[str] = ()
    p_open_fail: float = 0.0
    seed: int = 0
    calls: int = field(default=0, init=False)
    opens: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for entry in self.script:
            if entry not in OUTCOMES:
                raise ConfigError(
                    f"unknown outcome {entry!r}; expected one of {OUTCOMES}", key="script"
                )
        for entry in self.open_script:
            if entry not in ("ok", "fail"):
                raise ConfigError(f"unknown open outcome {entry!r}", key="open_script")
        total = 0.0
        for name in ("p_error", "p_raise", "p_die", "p_hang", "p_open_fail"):
            p = _probability(name, getattr(self, name))
            total += p if name != "p_open_fail" else 0.0
        if total > 1.0 + 1e-9:
            raise ConfigError(f"call failure probabilities sum to {total} > 1", key="failures")
        if not (isinstance(self.hang_s, (int, float)) and self.hang_s >= 0):
            raise ConfigError(f"must be >= 0, got {self.hang_s!r}", key="hang_s")
        self._script = list(self.script)
        self._open_script = list(self.open_script)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    @classmethod
    def coerce(cls, value: object, seed: int) -> FailurePlan | None:
        """A plan from ``options["failures"]``: a plan as is, a mapping as keyword arguments."""
        if value is None or isinstance(value, FailurePlan):
            return value
        if isinstance(value, Mapping):
            kwargs = {"seed": seed, **value}
            try:
                return cls(**kwargs)
            except TypeError as exc:
                raise ConfigError(str(exc), key="failures") from None
        raise ConfigError(f"expected a FailurePlan or a mapping, got {value!r}", key="failures")

    def next_call(self) -> str:
        """Draw the outcome of the next call."""
        with self._lock:
            self.calls += 1
            if self._script:
                return self._script.pop(0)
            r = self._rng.random()
            for outcome, p in (
                ("error", self.p_error), ("raise", self.p_raise),
                ("die", self.p_die), ("hang", self.p_hang),
            ):  # fmt: skip
                if r < p:
                    return outcome
                r -= p
            return "ok"

    def next_open(self) -> bool:
        """Whether the next open succeeds."""
        with self._lock:
            self.opens += 1
            if self._open_script:
                return self._open_script.pop(0) == "ok"
            return self._rng.random() >= self.p_open_fail


def _seconds(options: Mapping[str, object], key: str, default: float = 0.0) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ConfigError(f"must be a number >= 0, got {value!r}", key=f"options.{key}")
    if not math.isfinite(value):
        raise ConfigError(f"must be finite, got {value!r}", key=f"options.{key}")
    return float(value)


def _positive_int(options: Mapping[str, object], key: str, default: int | None) -> int | None:
    value = options.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"must be an integer >= 1, got {value!r}", key=f"options.{key}")
    return value


def _count_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


class _Sequence:
    """One completion in a simulated context's slots."""

    __slots__ = (
        "first_token_s", "hash", "midstream", "n_out", "on_token", "pieces", "prefill_left",
        "prompt_tokens", "script", "start", "started_prefill",
    )  # fmt: skip

    def __init__(
        self,
        prompt: str,
        params: CompletionParams,
        on_token: TokenCallback | None,
        n_out: int,
        midstream: bool,
        script: list[str] | None = None,
    ) -> None:
        self.start = time.perf_counter()
        self.on_token = on_token
        self.prompt_tokens = _count_tokens(prompt)
        self.prefill_left = self.prompt_tokens
        self.started_prefill = False
        self.midstream = midstream
        self.hash = _hash(prompt) + params.seed
        #: The pieces of a scripted reply (JSON for a schema), else ``None``: words.
        self.script = script
        self.n_out = n_out if script is None else min(n_out, len(script))
        self.pieces: list[str] = []
        self.first_token_s = 0.0

    def completion(self, finish: str) -> Completion:
        return Completion(
            text="".join(self.pieces),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.pieces),
            finish_reason=finish,
            first_token_s=self.first_token_s,
            service_s=time.perf_counter() - self.start,
        )


class SimulatedBackend:
    """One simulated context that batches up to ``spec.slots`` completions. Every method blocks
    the calling thread, like a llama.cpp context.

    ``calls`` holds ``(op, text)`` of the last :data:`TRACE_LEN` calls that started (for tests;
    bounded, so a long benchmark does not keep every prompt alive).
    """

    def __init__(self, spec: ModelSpec, replica: int) -> None:
        opts = spec.options
        self.spec = spec
        self.replica = replica
        self.slots = spec.slots
        self._template = ChatTemplate(None, model=spec.name)
        self.base_s = _seconds(opts, "base_s")
        self.per_prompt_token_s = _seconds(opts, "per_prompt_token_s")
        self.per_output_token_s = _seconds(opts, "per_output_token_s")
        self.batch_slope = _seconds(opts, "batch_slope", 0.1)
        self.jitter = _seconds(opts, "jitter")
        if self.jitter >= 1.0:
            raise ConfigError("must be < 1", key="options.jitter")
        seed = opts.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"must be an integer, got {seed!r}", key="options.seed")
        self.output_tokens: int | None = _positive_int(opts, "output_tokens", None)
        self.embed_dim: int = _positive_int(opts, "embed_dim", 8) or 8
        self.prefill_chunk: int = _positive_int(opts, "prefill_chunk", 512) or 512
        gate = opts.get("gate")
        if gate is not None and not isinstance(gate, threading.Event):
            raise ConfigError("must be a threading.Event", key="options.gate")
        self._gate = gate
        on_call = opts.get("on_call")
        if on_call is not None and not callable(on_call):
            raise ConfigError("must be callable", key="options.on_call")
        self._on_call: Callable[[str, str], object] | None = on_call
        self.failures = FailurePlan.coerce(opts.get("failures"), seed)
        self._rng = random.Random(seed * 1_000_003 + replica)
        self._dead = False
        self._closed = False
        self._seqs: dict[int, _Sequence] = {}
        self.calls: deque[tuple[str, str]] = deque(maxlen=TRACE_LEN)

    # -- the BatchBackend protocol ----------------------------------------------------------
    def admit(self, seq: int, params: CompletionParams, on_token: TokenCallback | None) -> None:
        """Take a completion into a free slot (its prompt is read by the next steps)."""
        if len(self._seqs) >= self.slots:
            raise BackendError(f"{self.spec.name}[{self.replica}]: no free slot")
        prompt, script = params.prompt, None
        if params.chat is not None:
            prompt = self._template.render(params.chat.messages, params.chat.tools)
            if params.chat.json_schema is not None:
                text = json.dumps(schema_instance(params.chat.json_schema, params.seed))
                script = [text[i : i + 4] for i in range(0, len(text), 4)]
        midstream = self._enter("complete", prompt)
        n_out = (
            params.max_tokens
            if self.output_tokens is None or script is not None
            else min(self.output_tokens, params.max_tokens)
        )
        self._seqs[seq] = _Sequence(prompt, params, on_token, n_out, midstream, script)

    def step(self) -> list[tuple[int, Completion]]:
        """Sleep one modelled step, then give every sequence its next token."""
        if self._closed:
            raise SimulatedCrash(f"{self.spec.name}: call on a closed context")
        if self._dead:
            raise SimulatedCrash(f"{self.spec.name}[{self.replica}]: context is dead")
        seqs = self._seqs
        if not seqs:
            return []
        prefill = 0.0
        for s in seqs.values():
            if s.prefill_left:
                chunk = min(self.prefill_chunk, s.prefill_left)
                prefill += self.per_prompt_token_s * chunk + (
                    0.0 if s.started_prefill else self.base_s
                )
                s.started_prefill = True
                s.prefill_left -= chunk
        decoding = sum(1 for s in seqs.values() if not s.prefill_left)
        step = prefill
        if decoding:
            step += self.per_output_token_s * (1.0 + self.batch_slope * (decoding - 1))
        _sleep(step * self._factor())
        ended: list[tuple[int, Completion]] = []
        for key, s in list(seqs.items()):
            if s.prefill_left:
                continue
            i = len(s.pieces)
            piece = _WORDS[(s.hash + i) % len(_WORDS)] + " " if s.script is None else s.script[i]
            s.pieces.append(piece)
            if i == 0:
                s.first_token_s = time.perf_counter() - s.start
            finish = None
            if s.on_token is not None and s.on_token(piece) is False:
                finish = "cancelled"
            elif s.midstream:
                self._dead = True
                raise SimulatedCrash(f"{self.spec.name}[{self.replica}]: died mid-stream")
            elif len(s.pieces) >= s.n_out:
                finish = "stop" if s.script is not None and s.n_out == len(s.script) else "length"
            if finish is not None:
                del seqs[key]
                ended.append((key, s.completion(finish)))
        return ended

    def cancel(self, seq: int) -> None:
        """Drop a sequence and free its slot."""
        self._seqs.pop(seq, None)

    def complete(
        self, params: CompletionParams, on_token: TokenCallback | None = None
    ) -> Completion:
        """Run one completion alone (admit, then step until it ends)."""
        return run_alone(self, params, on_token)

    def embed(self, texts: Sequence[str]) -> Embedding:
        """Deterministic unit vectors, one per text, after the modelled prompt-processing time."""
        start = time.perf_counter()
        if self._enter("embed", "\n".join(texts)):
            raise SimulatedCrash(f"{self.spec.name}[{self.replica}]: died mid-call")
        tokens = sum(_count_tokens(t) for t in texts)
        _sleep((self.base_s + self.per_prompt_token_s * tokens) * self._factor())
        return Embedding(
            vectors=[_vector(t, self.embed_dim) for t in texts],
            prompt_tokens=tokens,
            service_s=time.perf_counter() - start,
        )

    def close(self) -> None:
        """Mark the context closed; later calls raise."""
        self._closed = True

    # -- internals --------------------------------------------------------------------------
    def _factor(self) -> float:
        if self.jitter == 0.0:
            return 1.0
        return 1.0 + self.jitter * (2.0 * self._rng.random() - 1.0)

    def _enter(self, op: str, text: str) -> bool:
        """Start a call: honour the gate, trace it, draw its fate; ``True`` means die mid-stream."""
        if self._closed:
            raise SimulatedCrash(f"{self.spec.name}: call on a closed context")
        if self._gate is not None:
            self._gate.wait()
        self.calls.append((op, text))
        if self._on_call is not None:
            self._on_call(op, text)
        if self._dead:
            raise SimulatedCrash(f"{self.spec.name}[{self.replica}]: context is dead")
        outcome = "ok" if self.failures is None else self.failures.next_call()
        if outcome == "ok":
            return False
        if outcome == "midstream":
            return True
        if outcome == "error":
            raise BackendError(f"{self.spec.name}[{self.replica}]: injected error")
        if outcome == "die":
            self._dead = True
            raise SimulatedCrash(f"{self.spec.name}[{self.replica}]: injected death")
        if outcome == "hang":
            assert self.failures is not None
            time.sleep(self.failures.hang_s)
            raise SimulatedCrash(
                f"{self.spec.name}[{self.replica}]: hung for {self.failures.hang_s}s"
            )
        raise SimulatedCrash(f"{self.spec.name}[{self.replica}]: injected crash")


def _sleep(seconds: float) -> None:
    if seconds > 0.0:
        time.sleep(seconds)


def _hash(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    )


def schema_instance(schema: Mapping[str, Any], seed: int = 0) -> Any:
    """A deterministic instance of a JSON schema that :func:`zeta._chat.check_schema` accepted:
    what a grammar-constrained model could produce. Varies with ``seed``."""
    rng = random.Random(seed)

    def gen(node: Any, depth: int) -> Any:
        if not isinstance(node, Mapping) or depth > 24:
            return None
        if "$ref" in node:
            return gen(resolve_pointer(schema, node["$ref"]), depth + 1)
        if "const" in node:
            return node["const"]
        if "enum" in node:
            return rng.choice(list(node["enum"]))
        for key in ("anyOf", "oneOf", "allOf"):
            if node.get(key):
                return gen(node[key][0], depth + 1)
        kind = node.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in node else "string"
        if kind == "object":
            props = node.get("properties", {})
            return {k: gen(v, depth + 1) for k, v in props.items()}
        if kind == "array":
            low = int(node.get("minItems", 0))
            high = max(low, min(int(node.get("maxItems", low + 2)), low + 2))
            items = node.get("items", {})
            return [gen(items, depth + 1) for _ in range(rng.randint(low, high))]
        if kind == "string":
            low = int(node.get("minLength", 0))
            high = int(node.get("maxLength", max(low, 12)))
            text = ""
            while len(text) < low or not text:
                text += rng.choice(_WORDS)
            return text[: max(low, min(high, len(text)))]
        if kind in ("integer", "number"):
            low = node.get("minimum", 0)
            high = max(low, node.get("maximum", low + 100))
            if kind == "number":
                return round(rng.uniform(low, high), 3)
            return rng.randint(math.ceil(low), max(math.ceil(low), math.floor(high)))
        if kind == "boolean":
            return rng.random() < 0.5
        return None

    return gen(schema, 0)


def _vector(text: str, dim: int) -> list[float]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=64).digest()
    raw = [(digest[i % 64] + 131 * (i // 64)) % 256 / 127.5 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def open_backend(spec: ModelSpec, replica: int) -> SimulatedBackend:
    """Open one simulated context for ``spec``: validate options, honour ``load_s`` and open faults.

    Raises:
        ConfigError: an option has an invalid value.
        ModelLoadError: the failure plan says this open fails.
    """
    backend = SimulatedBackend(spec, replica)
    _sleep(_seconds(spec.options, "load_s"))
    if backend.failures is not None and not backend.failures.next_open():
        raise ModelLoadError(
            f"injected load failure (replica {replica})", path=spec.path or spec.name
        )
    return backend
