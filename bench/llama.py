"""zeta vs calling llama-cpp-python directly, on generated ladder models.

``python -m bench llama [--models coder-tiny,coder] [--requests N] [--tokens T] [--rounds R]
[--seed S] [--json]``

The same seeded prompts (greedy, exactly T tokens each) go through four contenders, one model
file, one thread each, in the same process, interleaved round by round so drift on a shared
machine hits all of them alike:

* ``llama_cpp.Llama``: the high-level llama-cpp-python API, one ``create_completion`` at a time
  (the baseline: what an application would call without zeta);
* ``zeta backend``: zeta's llama.cpp backend called directly, no scheduler;
* ``zeta c=1``: ``Scheduler.complete``, one request at a time (every request pays the routing,
  the mailbox and the thread hop with nothing to overlap them);
* ``zeta c=8``: eight requests in flight, the way an agent fleet would use it.

Reported: generated tokens per second (median over rounds) and zeta's overhead, ``1 -
zeta / baseline``, against ``llama_cpp.Llama`` (target: at most 3% on the smallest coder) and
against zeta's own backend (the scheduler's share alone).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from zeta import Kind, ModelSpec
from zeta.backends import CompletionParams
from zeta.backends.llama_cpp import open_backend
from zeta.testing import ladder_spec

WORDS = "def return value data model import class self list dict the answer because".split()


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(n)]


def run_llama(llm: Any, ps: Sequence[str], tokens: int) -> int:
    total = 0
    for p in ps:
        out = llm.create_completion(p, max_tokens=tokens, temperature=0.0)
        total += out["usage"]["completion_tokens"]
    return total


def run_backend(backend: Any, ps: Sequence[str], tokens: int) -> int:
    return sum(
        backend.complete(CompletionParams(p, max_tokens=tokens)).completion_tokens for p in ps
    )


async def run_scheduler(zs: Any, ps: Sequence[str], tokens: int, concurrency: int) -> int:
    total = 0
    limiter = anyio.Semaphore(concurrency)

    async def one(p: str) -> None:
        nonlocal total
        async with limiter:
            result = await zs.complete(p, kind=Kind.CODE, max_tokens=tokens)
            total += result.completion_tokens

    async with anyio.create_task_group() as tg:
        for p in ps:
            tg.start_soon(one, p)
    return total


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama

    from zeta._scheduler import Scheduler

    spec: ModelSpec = ladder_spec(
        name, name="coder", n_threads=args.threads, n_ctx=512, kinds=frozenset({Kind.CODE})
    )
    assert spec.path is not None
    ps = prompts(args.requests, args.seed)
    llm = Llama(
        spec.path, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    backend = open_backend(spec, 0)
    rates: dict[str, list[float]] = {"llama_cpp.Llama": [], "zeta backend": [], "zeta c=1": []}
    rates[f"zeta c={args.concurrency}"] = []
    expected = args.requests * args.tokens

    def record(label: str, seconds: float, n: int) -> None:
        if n != expected:
            raise SystemExit(f"{label}: generated {n} tokens, expected {expected}")
        rates[label].append(n / seconds)

    async def scheduled() -> None:
        async with Scheduler(models=[spec], policy="dynamic") as zs:
            await run_scheduler(zs, ps[:2], args.tokens, 1)  # warm up
            run_llama(llm, ps[:2], args.tokens)
            run_backend(backend, ps[:2], args.tokens)
            for _ in range(args.rounds):
                record("llama_cpp.Llama", *timed(lambda: run_llama(llm, ps, args.tokens)))
                record("zeta backend", *timed(lambda: run_backend(backend, ps, args.tokens)))
                for c in (1, args.concurrency):
                    t0 = time.perf_counter()
                    n = await run_scheduler(zs, ps, args.tokens, c)
                    record(f"zeta c={c}", time.perf_counter() - t0, n)

    try:
        anyio.run(scheduled)
    finally:
        backend.close()
        llm.close()
    tps = {label: statistics.median(v) for label, v in rates.items()}
    base, own = tps["llama_cpp.Llama"], tps["zeta backend"]
    return {
        "model": name,
        "requests": args.requests,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "tokens_per_s": tps,
        "overhead_vs_llama_cpp": {
            k: 1.0 - v / base for k, v in tps.items() if k.startswith("zeta")
        },
        "overhead_vs_zeta_backend": {
            k: 1.0 - v / own for k, v in tps.items() if k.startswith("zeta c=")
        },
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench llama", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--models", default="coder-tiny,coder", help="ladder models to run")
    parser.add_argument("--requests", type=int, default=24, help="requests per round")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (median reported)")
    parser.add_argument("--concurrency", type=int, default=8, help="in flight for the last run")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object, last")
    args = parser.parse_args(argv)

    results = [bench_model(name, args) for name in args.models.split(",")]
    for r in results:
        print(f"{r['model']}: {r['requests']} requests x {r['tokens_per_request']} tokens, "
              f"median of {r['rounds']} rounds")  # fmt: skip
        for label, tps in r["tokens_per_s"].items():
            over = r["overhead_vs_llama_cpp"].get(label)
            note = "" if over is None else f"  overhead vs llama_cpp.Llama {over:+.1%}"
            print(f"  {label:16s} {tps:9.0f} tokens/s{note}")
        for label, over in r["overhead_vs_zeta_backend"].items():
            print(f"  {label:16s} scheduler overhead vs zeta backend {over:+.1%}")
    if args.json:
        print(json.dumps({"suite": "llama", "seed": args.seed, "results": results}))
    return 0
