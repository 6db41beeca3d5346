"""``zeta profile``: measure each configured model on its real backend, as a simulator fleet.

For every model :func:`measure_fleet` opens one context (replica 0) through the model's own
backend and measures, on this host:

* the per-call overhead and the prefill time per prompt token: the time to the first token of
  fresh prompts of two lengths, one token generated (the median of ``rounds`` each; every
  prompt is new, so no cached prefix shortens it), fitted as ``call_s + prefill_token_s * n``;
  for a model that only embeds, the same from one-text embeddings;
* the decode step time with ``1..slots`` sequences busy: ``k`` sequences admitted and
  prefilled, then ``steps`` decode steps timed;
* the slowdown while other models on the same device are busy: on a live
  :class:`~zeta.Scheduler` over the same models (one replica each, after the contexts above
  are closed), its per-token time with one request (an embedding model: its time for one text)
  while ``1, 2, ...`` of the others are kept busy, over its time alone. Measured through the
  actors, so their worker threads, the event loop and the Python between decode steps weigh in
  as in service (bare contexts in threads read a one-thread coder 2.2-3.8x slower beside two
  others on two cores, live 2.0x);
* the jitter: the spread of its one-sequence step times.

The result is a :class:`~zeta.sim.Fleet` the simulator loads (:func:`~zeta.sim.load_fleet`);
:func:`fleet_toml` writes it in the documented TOML form.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
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
    measured: list[tuple[float, float, list[float], float]] = []
    try:
        for spec in specs:
            opened.append(batched(get_backend(spec.backend)(spec, 0)))
            report(f"opened {spec.name}")
        for spec, backend in zip(specs, opened, strict=True):
            call_s, per_token = _prefill(spec, backend, rounds, salt)
            report(
                f"{spec.name}: call {call_s * 1e3:.2f} ms, prefill {per_token * 1e6:.1f} us/token"
            )
            if _embeds_only(spec):
                step_s, jitter = [max(per_token, 1e-6)] * spec.slots, 0.0
            else:
                step_s, samples = _steps(backend, spec.slots, steps, rounds, salt)
                report(f"{spec.name}: step {', '.join(f'{s * 1e3:.2f}' for s in step_s)} ms")
                jitter = _jitter(samples)
            measured.append((call_s, per_token, step_s, jitter))
    finally:
        for backend in opened:
            backend.close()
    # Co-load through the scheduler's own actors, once the contexts above are closed.
    factors = _live_coload(specs, rounds, steps, salt, report) if coload else {}
    models = [
        SimModel(
            _sim_spec(spec),
            ServiceProfile(call_s, per_token, tuple(step_s), factors.get(spec.name, (1.0,)), jit),
        )
        for spec, (call_s, per_token, step_s, jit) in zip(specs, measured, strict=True)
    ]
    return Fleet(tuple(models), _lanes(specs))


def _live_coload(
    specs: Sequence[ModelSpec],
    rounds: int,
    steps: int,
    salt: _Salt,
    report: Callable[[str], None],
) -> dict[str, tuple[float, ...]]:
    """Per model, how much slower it serves while ``1, 2, ...`` of the other models on its
    device are kept busy, over its time alone: measured on a live :class:`~zeta.Scheduler`
    (one replica each), so the actors' worker threads, the event loop and the Python between
    decode steps weigh in as they do in service. A decoding model's figure is its per-token
    time of one request; an embedding model's, its time for one text. Never faster when
    busier."""
    import anyio

    from .._scheduler import Scheduler

    tokens = max(32, 2 * steps)

    async def one(zs: Scheduler, spec: ModelSpec, max_tokens: int) -> float:
        """One request to ``spec``: an embedding's service time, else the per-token decode."""
        if _embeds_only(spec):
            return (await zs.embed(prompt_of(65, salt()), model=spec.name)).service_s
        c = await zs.complete(prompt_of(5, salt()), model=spec.name, max_tokens=max_tokens)
        return (c.service_s - c.first_token_s) / max(1, c.completion_tokens - 1)

    async def timed(zs: Scheduler, spec: ModelSpec) -> float:
        samples = [await one(zs, spec, tokens) for _ in range(max(1, rounds) + 1)]
        return statistics.median(samples[1:])  # the first is a warm-up

    async def busy(zs: Scheduler, other: ModelSpec, stop: anyio.Event) -> None:
        while not stop.is_set():
            await one(zs, other, 48)

    async def beside(zs: Scheduler, spec: ModelSpec, others: Sequence[ModelSpec]) -> float:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for other in others:
                tg.start_soon(busy, zs, other, stop)
            await anyio.sleep(0.05)  # their first requests are running
            t = await timed(zs, spec)
            stop.set()
        return t

    async def main() -> dict[str, tuple[float, ...]]:
        out: dict[str, tuple[float, ...]] = {}
        live = [replace(s, replicas=1) for s in specs]
        async with Scheduler(live, admission_timeout=None, calibrator=None) as zs:
            for i, spec in enumerate(live):
                others = [s for j, s in enumerate(live) if j != i and s.device == spec.device]
                alone = await timed(zs, spec)
                factors = [1.0]
                for n in range(1, len(others) + 1):
                    slow = await beside(zs, spec, others[:n]) / alone if alone > 0 else 1.0
                    factors.append(max(factors[-1], slow))
                out[spec.name] = tuple(factors)
                report(f"{spec.name}: coload {', '.join(f'{f:.2f}' for f in factors)}")
        return out

    return anyio.run(main)


def _embeds_only(spec: ModelSpec) -> bool:
    """Whether ``spec`` serves embeddings and nothing else (timed per text, not per token)."""
    return spec.kinds == frozenset({Kind.EMBED})


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
    embeds = _embeds_only(spec)
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
