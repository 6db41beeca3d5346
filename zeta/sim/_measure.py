"""``zeta profile``: measure each configured model on its real backend, as a simulator fleet.

For every model :func:`measure_fleet` opens one context (replica 0) through the model's own
backend and measures, on this host:

* the per-call overhead and the prefill time per prompt token: the time to the first token of
  fresh prompts of two lengths, one token generated (the median of ``rounds`` each; every
  prompt is new, so no cached prefix shortens it), fitted as ``call_s + prefill_token_s * n``;
  for a model that only embeds, the same from one-text embeddings;
* the decode step time with ``1..slots`` sequences busy: ``k`` sequences admitted and
  prefilled, then ``steps`` decode steps timed;
* the slowdown while other models on the same device are busy: its one-sequence step time while
  ``1, 2, ...`` of the others work in their own threads (decoding, or embedding for a model that
  only embeds) (each context stays on one thread),
  over its step time alone; for a model that only embeds, its embedding time beside the models
  that decode, over its time alone. On the CPU a slowdown is capped at what the cores allow
  (:func:`_cpu_bound`: the threads of the busy models over the cores, at least 1);
* the jitter: the spread of its one-sequence step times.

The result is a :class:`~zeta.sim.Fleet` the simulator loads (:func:`~zeta.sim.load_fleet`);
:func:`fleet_toml` writes it in the documented TOML form.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._types import Kind, ModelSpec
from ..backends import get_backend
from ..backends._base import BatchBackend, CompletionParams, batched, run_alone
from ._profile import Device, Fleet, ServiceProfile, SimModel
from ._real import prompt_of

__all__ = ["fleet_toml", "measure_fleet"]


class _Salt:
    """Fresh numbers for prompts, from any thread (``next`` on a count is atomic)."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def __call__(self) -> int:
        return next(self._count)


def measure_fleet(
    specs: Sequence[ModelSpec],
    *,
    rounds: int = 3,
    steps: int = 16,
    coload: bool = True,
    report: Callable[[str], None] = lambda line: None,
) -> Fleet:
    """Measure every model of ``specs`` on its backend on this host (blocks; seconds to
    minutes). ``report`` receives one progress line per measurement.

    Raises:
        ModelLoadError: a model would not load.
    """
    salt = _Salt()
    opened: list[BatchBackend] = []
    try:
        for spec in specs:
            opened.append(batched(get_backend(spec.backend)(spec, 0)))
            report(f"opened {spec.name}")
        models = []
        for i, (spec, backend) in enumerate(zip(specs, opened, strict=True)):
            call_s, per_token = _prefill(spec, backend, rounds, salt)
            report(
                f"{spec.name}: call {call_s * 1e3:.2f} ms, prefill {per_token * 1e6:.1f} us/token"
            )
            if spec.kinds == frozenset({Kind.EMBED}):
                step_s = [max(per_token, 1e-6)] * spec.slots
                jitter, factors = 0.0, [1.0]
                if coload:
                    # An embedding is a prefill: it slows beside busy models as a decode does.
                    decoders = [
                        (s, b)
                        for s, b in zip(specs, opened, strict=True)
                        if s.device == spec.device and s.kinds != frozenset({Kind.EMBED})
                    ]
                    alone = _timed_embeds(backend, rounds, salt)
                    for n in range(1, len(decoders) + 1):
                        busy = _beside(
                            functools.partial(_timed_embeds, backend, rounds, salt),
                            salt,
                            [b for _, b in decoders[:n]],
                        )
                        # Never faster when busier; never slower than the CPU share allows.
                        bound = _cpu_bound(spec, [s for s, _ in decoders[:n]])
                        factors.append(min(max(factors[-1], busy / alone), bound))
                    report(f"{spec.name}: coload {', '.join(f'{f:.2f}' for f in factors)}")
            else:
                step_s, samples = _steps(backend, spec.slots, steps, rounds, salt)
                report(f"{spec.name}: step {', '.join(f'{s * 1e3:.2f}' for s in step_s)} ms")
                jitter = _jitter(samples)
                factors = [1.0]
                if coload:
                    others = [
                        (s, b)
                        for j, (s, b) in enumerate(zip(specs, opened, strict=True))
                        if j != i and s.device == spec.device
                    ]
                    for n in range(1, len(others) + 1):
                        busy = _busy_step(backend, steps, salt, [b for _, b in others[:n]])
                        # Never faster when busier; never slower than the CPU share allows.
                        bound = _cpu_bound(spec, [s for s, _ in others[:n]])
                        factors.append(min(max(factors[-1], busy / step_s[0]), bound))
                    report(f"{spec.name}: coload {', '.join(f'{f:.2f}' for f in factors)}")
            profile = ServiceProfile(call_s, per_token, tuple(step_s), tuple(factors), jitter)
            models.append(SimModel(_sim_spec(spec), profile))
        return Fleet(tuple(models), _lanes(specs))
    finally:
        for backend in opened:
            backend.close()


def _cpu_bound(spec: ModelSpec, others: Sequence[ModelSpec]) -> float:
    """The most a CPU model can slow beside ``others``: its threads lose at most the share of
    the cores that the threads of all of them exceed, ``threads / cores`` (at least 1).

    Beside two other models the profiler measured a tiny coder 2.2-3.8x slower on two cores with
    one thread each, where the cores allow 1.5x; the excess is likely the measurement's own
    threads (Python between steps, contending for the GIL). With the bound, ``bench simreal``
    (steady, three live repeats) put the simulated p95 per kind at -20% to -31% of the live
    one, where the unbounded profile had put it at +58% to +243%.
    ``inf`` on a GPU: no bound."""
    if spec.device is not None:
        return math.inf
    cores = float(os.cpu_count() or 1)
    threads = spec.n_threads + sum(o.n_threads for o in others)
    return max(1.0, threads / cores)


def _sim_spec(spec: ModelSpec) -> ModelSpec:
    return ModelSpec(
        spec.name,
        kinds=spec.kinds,
        preferred=spec.preferred,
        quality=spec.quality,
        replicas=spec.replicas,
        slots=spec.slots,
        device=spec.device,
        backend="simulated",
    )


def _lanes(specs: Sequence[ModelSpec]) -> dict[Device, float]:
    """Per device, how many models can be busy before it saturates: the host's cores over the
    threads of a model on the CPU; 1 for a GPU."""
    lanes: dict[Device, float] = {}
    cores = float(os.cpu_count() or 1)
    for spec in specs:
        if spec.device is None:
            lanes[None] = max(1.0, cores / max(1, spec.n_threads))
        else:
            lanes[spec.device] = 1.0
    return lanes


def _prefill(
    spec: ModelSpec, backend: BatchBackend, rounds: int, salt: _Salt
) -> tuple[float, float]:
    """``(call_s, prefill_token_s)`` fitted from fresh prompts of two lengths."""
    short, long = 4, max(8, min(200, spec.n_ctx // 3))
    points: list[tuple[float, float]] = []
    embeds = spec.kinds == frozenset({Kind.EMBED})
    for n_words in (short, long):
        times, tokens = [], []
        for _ in range(rounds + 1):  # the first is a warm-up
            text = prompt_of(n_words + 1, salt())
            if embeds:
                t0 = time.perf_counter()
                result = backend.embed([text])
                times.append(time.perf_counter() - t0)
                tokens.append(result.prompt_tokens)
            else:
                done = run_alone(backend, CompletionParams(text, max_tokens=1))
                times.append(done.first_token_s)
                tokens.append(done.prompt_tokens)
        points.append((statistics.median(tokens[1:]), statistics.median(times[1:])))
    (n1, t1), (n2, t2) = points
    per_token = max(0.0, (t2 - t1) / (n2 - n1)) if n2 > n1 else 0.0
    return max(0.0, t1 - per_token * n1), per_token


def _decode(backend: BatchBackend, k: int, salt: _Salt, budget: int) -> list[int]:
    """Admit ``k`` fresh sequences of ``budget`` tokens and step until all have prefilled."""
    keys = [salt() for _ in range(k)]
    started: set[int] = set()
    for key in keys:

        def seen(piece: str, key: int = key) -> bool:
            started.add(key)
            return True

        backend.admit(key, CompletionParams(prompt_of(5, key), max_tokens=budget), seen)
    while len(started) < k:
        if backend.step() and len(started) < k:
            break
    return keys


def _timed_steps(backend: BatchBackend, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        backend.step()
    return (time.perf_counter() - t0) / steps


def _steps(
    backend: BatchBackend, slots: int, steps: int, rounds: int, salt: _Salt
) -> tuple[list[float], list[float]]:
    """Step time with ``1..slots`` busy (median over rounds), and the one-busy samples."""
    result: list[float] = []
    ones: list[float] = []
    for k in range(1, slots + 1):
        samples = []
        for _ in range(rounds):
            keys = _decode(backend, k, salt, steps * 2 + 4)
            samples.append(_timed_steps(backend, steps))
            for key in keys:
                backend.cancel(key)
        if k == 1:
            ones = samples
        result.append(statistics.median(samples))
    # Noise can make a larger batch look faster; a step never gets cheaper with more work.
    for k in range(1, len(result)):
        result[k] = max(result[k], result[k - 1])
    return result, ones


def _timed_embeds(backend: BatchBackend, rounds: int, salt: _Salt) -> float:
    """Median time of ``rounds`` one-text embeddings of a fresh 64-word prompt."""
    times = []
    for _ in range(max(1, rounds)):
        text = prompt_of(65, salt())
        t0 = time.perf_counter()
        backend.embed([text])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _busy_step(
    backend: BatchBackend, steps: int, salt: _Salt, others: Sequence[BatchBackend]
) -> float:
    """One-sequence step time of ``backend`` while each of ``others`` decodes one sequence in
    its own thread."""

    def timed() -> float:
        keys = _decode(backend, 1, salt, steps * 2 + 4)
        busy = _timed_steps(backend, steps)
        for key in keys:
            backend.cancel(key)
        return busy

    return _beside(timed, salt, others)


def _beside(measure: Callable[[], float], salt: _Salt, others: Sequence[BatchBackend]) -> float:
    """``measure()`` while each of ``others`` works in its own thread: decodes one sequence, or
    embeds texts one after another if it only embeds."""
    stop = threading.Event()
    ready = threading.Barrier(len(others) + 1)
    errors: list[BaseException] = []

    def run(other: BatchBackend) -> None:
        try:
            if other.spec.kinds == frozenset({Kind.EMBED}):
                ready.wait()
                while not stop.is_set():
                    other.embed([prompt_of(65, salt())])
                return
            keys = _decode(other, 1, salt, 48)
            ready.wait()
            while not stop.is_set():
                if other.step():  # its sequence ended: start another
                    keys = _decode(other, 1, salt, 48)
            for key in keys:
                other.cancel(key)
        except BaseException as exc:  # reported below; the barrier must not hang
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=run, args=(o,), daemon=True) for o in others]
    for t in threads:
        t.start()
    try:
        ready.wait()
        busy = measure()
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return busy


def _jitter(samples: Sequence[float]) -> float:
    """The relative half-range of ``samples``, as a uniform jitter, below 1."""
    if len(samples) < 2:
        return 0.0
    mid = statistics.median(samples)
    if mid <= 0.0:
        return 0.0
    return min(0.5, (max(samples) - min(samples)) / (2.0 * mid))


def fleet_toml(fleet: Fleet) -> str:
    """``fleet`` as the TOML :func:`~zeta.sim.load_fleet` reads."""

    def value(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else "0.0"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    data = fleet.to_dict()
    lines = ["# zeta profile: measured service times (see zeta.sim's ServiceProfile)", ""]
    lines.append("[devices]")
    for name, table in data["devices"].items():
        lines.append(f"{name} = {{ lanes = {value(table['lanes'])} }}")
    for model in data["models"]:
        lines += ["", "[[models]]"]
        lines += [f"{key} = {value(v)}" for key, v in model.items()]
    return "\n".join(lines) + "\n"
