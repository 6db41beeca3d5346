"""Scheduler overhead: zeta with a zero-cost backend beside bare queue-and-worker baselines.

Every contender serves the same zero-cost call (a simulated ``complete`` with all costs zero and
one output token) from one context, at concurrency 1 and 64, in this one process:

* ``bare/to_thread``  an asyncio queue and one worker task; each request hops to a thread with
  ``anyio.to_thread.run_sync`` behind a ``CapacityLimiter(1)``. This is the reference baseline.
* ``bare/executor``   the same with ``loop.run_in_executor`` on one dedicated executor thread.
* ``bare/thread``     the same with one persistent thread woken through a ``SimpleQueue`` and
  reporting back with ``call_soon_threadsafe`` (the mechanism zeta's default worker uses).
* ``zeta/thread``     ``Scheduler.complete`` end to end (validation, routing through the scoring
  kernel, priority mailbox, actor, ledger) with the default dedicated worker thread.
* ``zeta/to_thread``  the same with ``worker="to_thread"``.
* ``zeta/thread (trio)`` the default scheduler under trio.

Reports requests per second and mean/p99 microseconds per request, and the ratio of zeta's
throughput to the reference baseline at concurrency 64 (target: at least 0.5).

    python -m bench overhead [--requests N] [--seed S] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from zeta import Kind, ModelSpec, Scheduler, kernel_implementation
from zeta.backends._base import CompletionParams
from zeta.backends.simulated import open_backend

CONCURRENCY = (1, 64)
PARAMS = CompletionParams(prompt="ping", max_tokens=1)


@dataclass
class Result:
    name: str
    concurrency: int
    requests: int
    seconds: float
    req_per_s: float
    mean_us: float
    p99_us: float


def _spec() -> ModelSpec:
    return ModelSpec("m", backend="simulated", options={})


async def _drive(call: Callable[[], Awaitable[object]], concurrency: int, requests: int) -> Result:
    """Run ``requests`` calls from ``concurrency`` concurrent callers; time each one."""
    latencies: list[float] = []
    per_caller = [
        requests // concurrency + (1 if i < requests % concurrency else 0)
        for i in range(concurrency)
    ]

    async def caller(n: int) -> None:
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            await call()
            latencies.append(clock() - t0)

    # Warm up (thread creation, first-call caches) outside the measurement.
    for _ in range(20):
        await call()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in per_caller:
            tg.start_soon(caller, n)
    seconds = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
    return Result(
        name="", concurrency=concurrency, requests=requests, seconds=seconds,
        req_per_s=requests / seconds, mean_us=statistics.fmean(latencies) * 1e6, p99_us=p99 * 1e6,
    )  # fmt: skip


# -- bare baselines (asyncio) -------------------------------------------------------------------
async def _bare(hop: str, concurrency: int, requests: int) -> Result:
    backend = open_backend(_spec(), 0)
    work = lambda: backend.complete(PARAMS)  # noqa: E731
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[asyncio.Future[object]] = asyncio.Queue()
    limiter = anyio.CapacityLimiter(1)
    executor = ThreadPoolExecutor(max_workers=1)
    jobs: queue.SimpleQueue[tuple[asyncio.Future[object]] | None] = queue.SimpleQueue()

    def thread_main() -> None:
        while (item := jobs.get()) is not None:
            fut = item[0]
            value = work()
            loop.call_soon_threadsafe(fut.set_result, value)

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()

    async def worker() -> None:
        while True:
            fut = await q.get()
            if hop == "to_thread":
                fut.set_result(await anyio.to_thread.run_sync(work, limiter=limiter))
            elif hop == "executor":
                fut.set_result(await loop.run_in_executor(executor, work))
            else:
                inner: asyncio.Future[object] = loop.create_future()
                jobs.put((inner,))
                fut.set_result(await inner)

    async def call() -> object:
        fut: asyncio.Future[object] = loop.create_future()
        q.put_nowait(fut)
        return await fut

    task = asyncio.ensure_future(worker())
    try:
        result = await _drive(call, concurrency, requests)
    finally:
        task.cancel()
        jobs.put(None)
        executor.shutdown(wait=False)
    result.name = f"bare/{hop}"
    return result


# -- zeta ---------------------------------------------------------------------------------------
async def _zeta(worker: str, concurrency: int, requests: int, seed: int) -> Result:
    async with Scheduler(
        [_spec()], worker=worker, mailbox_capacity=max(128, 2 * concurrency),  # type: ignore[arg-type]
        admission_timeout=None, seed=seed, sample_interval=3600.0,
    ) as zs:  # fmt: skip
        result = await _drive(
            lambda: zs.complete("ping", kind=Kind.SIMPLE, max_tokens=1), concurrency, requests
        )
    result.name = f"zeta/{worker}"
    return result


def _run(fn: Callable[..., Awaitable[Result]], backend: str, *args: Any) -> Result:
    result: Result = anyio.run(fn, *args, backend=backend)
    if backend != "asyncio":
        result.name += f" ({backend})"
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--requests", type=int, default=20_000, help="requests per run at concurrency 64"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    args = parser.parse_args(argv)

    results: list[Result] = []
    for c in CONCURRENCY:
        n = args.requests if c > 1 else max(1, args.requests // 4)
        for hop in ("to_thread", "executor", "thread"):
            results.append(_run(_bare, "asyncio", hop, c, n))
        for worker in ("thread", "to_thread"):
            results.append(_run(_zeta, "asyncio", worker, c, n, args.seed))
        results.append(_run(_zeta, "trio", "thread", c, n, args.seed))

    by = {(r.name, r.concurrency): r for r in results}
    ratios = {
        f"{r.name} vs bare/to_thread @{r.concurrency}": r.req_per_s
        / by[("bare/to_thread", r.concurrency)].req_per_s
        for r in results
        if r.name.startswith("zeta")
    }
    headline = ratios["zeta/thread vs bare/to_thread @64"]

    print(
        f"scheduler overhead, zero-cost backend, kernel={kernel_implementation()}, python {platform.python_version()}"
    )
    print(f"{'contender':24s} {'conc':>4s} {'req/s':>10s} {'mean us':>9s} {'p99 us':>9s}")
    for r in results:
        print(
            f"{r.name:24s} {r.concurrency:4d} {r.req_per_s:10.0f} {r.mean_us:9.1f} {r.p99_us:9.1f}"
        )
    print()
    for name, ratio in ratios.items():
        print(f"{name:45s} {ratio:6.2f}x")
    print(
        f"target (zeta/thread >= 0.5x bare/to_thread at concurrency 64): {'met' if headline >= 0.5 else 'NOT met'}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "suite": "overhead",
                    "kernel": kernel_implementation(),
                    "python": platform.python_version(),
                    "seed": args.seed,
                    "results": [asdict(r) for r in results],
                    "ratios": ratios,
                    "ratio_c64": headline,
                    "target_met": headline >= 0.5,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
