"""`zeta serve`: what the HTTP server adds to a request, against the same call in process.

``python -m bench serve [--tiny] [--setups zero-cost,coder] [--concurrency 1,16] [--requests N] [--coder-requests M]
[--tokens T] [--rounds R] [--threads N] [--seed S] [--json]``

Two setups, each one model and one config file, served two ways at once in this invocation:

* ``in-process``: ``Scheduler.complete`` / ``Scheduler.chat`` called in this process, on a
  scheduler built from the config (``Scheduler.from_config``);
* ``http``: ``zeta serve --config`` in a child process, the same config, called over loopback
  HTTP: ``POST /v1/completions`` and ``POST /v1/chat/completions``, non-streamed, the JSON
  response parsed, by a minimal keep-alive HTTP/1.1 client (one connection per caller), so the
  figure is what the server path adds, not what a client library costs;
* ``http+openai``: the same server called through the official ``openai`` client
  (``AsyncOpenAI``), what an agent framework sees: the server path plus the client's own cost.

Setups: ``zero-cost``, the simulated backend with every cost zero (what is left is zeta's own
path, and HTTP's); ``coder``, the ladder coder on llama.cpp (``coder-tiny`` with ``--tiny``), one
thread, greedy, at most T tokens per request. C callers (each level of ``--concurrency``) send
requests one after another, closed loop, seeded prompts.

Rounds interleave: every round runs both contenders at every level, the order alternating per
round, so drift on a shared machine hits both alike. Reported per level: requests per second
(median, min-max over rounds), p50 and p99 latency (over every round's requests), and for each
HTTP contender the ratio of its requests per second to in-process and the milliseconds it adds
at p50, both paired within each round (median, min-max).

Target: at one caller, ``http`` adds at most 1 ms at p50 per request (checked for every setup
and endpoint; printed as met or NOT met). ``http+openai`` is reported beside it, not held to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import openai
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from zeta import Kind, Outcome, Priority, Scheduler
from zeta.testing import LatencyStats, RequestRecord

WORDS = "def return value data model import class self list dict the answer because".split()
INPROC, HTTP, OPENAI = "in-process", "http", "http+openai"
CONTENDERS = (INPROC, HTTP, OPENAI)
ENDPOINTS = ("completions", "chat")
SETUPS = ("zero-cost", "coder")
#: The target: milliseconds HTTP may add at p50, at one caller.
TARGET_MS = 1.0
#: Requests per contender and endpoint before the rounds (connections, caches, first calls).
WARM_UP = 20


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) for _ in range(n)]


@dataclass
class Run:
    """One contender at one level in one round."""

    seconds: float
    requests: int
    latencies: list[float]

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds


async def drive(call: Callable[[str], Awaitable[None]], work: Sequence[Sequence[str]]) -> Run:
    """Closed loop: one caller per entry of ``work``, each sending its prompts one by one."""
    latencies: list[float] = []

    async def caller(mine: Sequence[str]) -> None:
        for prompt in mine:
            t0 = time.perf_counter()
            await call(prompt)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for mine in work:
            tg.start_soon(caller, mine)
    return Run(time.perf_counter() - t0, len(latencies), latencies)


# -- the two setups -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    name: str
    model: str
    requests: int  # per run
    config: str  # the [[models]] table


def setups(args: argparse.Namespace) -> list[Setup]:
    coder = "coder-tiny" if args.tiny else "coder"
    slots = max(args.concurrency)
    text_kinds = '["simple", "code", "reason"]'
    return [
        Setup(
            "zero-cost",
            "zero",
            args.requests,
            f"""
            [[models]]
            name = "zero"
            backend = "simulated"
            kinds = {text_kinds}
            slots = {slots}
            """,
        ),
        Setup(
            "coder",
            coder,
            args.coder_requests,
            f"""
            [[models]]
            name = "{coder}"
            ladder = "{coder}"
            kinds = {text_kinds}
            slots = {slots}
            n_ctx = 256
            n_threads = {args.threads}
            """,
        ),
    ]


def write_config(setup: Setup, directory: Path, concurrency: int) -> Path:
    path = directory / f"{setup.name}.toml"
    body = f"""
        [scheduler]
        mailbox_capacity = {max(64, 4 * concurrency)}
        kinds = ["simple", "code", "reason"]

        [serve]
        host = "127.0.0.1"
        port = 0
        api_key_env = "ZETA_BENCH_NO_KEY"
        """
    path.write_text(textwrap.dedent(body) + textwrap.dedent(setup.config))
    return path


@contextlib.contextmanager
def zeta_serve(config: Path) -> Iterator[str]:
    """``zeta serve --config CONFIG`` in a child process; yields its base URL."""
    env = {k: v for k, v in os.environ.items() if k != "ZETA_BENCH_NO_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zeta", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None
    errors: list[str] = []
    # Read stderr as it comes, so a chatty server never blocks on a full pipe.
    drain = threading.Thread(target=lambda: errors.extend(stderr), daemon=True)
    drain.start()
    try:
        line = stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        if match is None:
            proc.wait(timeout=30)
            drain.join(timeout=5)
            raise SystemExit(f"zeta serve did not start: {line}{''.join(errors)[-2000:]}")
        yield match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the contenders -----------------------------------------------------------------------------


def in_process(zs: Scheduler, endpoint: str, tokens: int) -> Callable[[str], Awaitable[None]]:
    if endpoint == "completions":

        async def complete(prompt: str) -> None:
            await zs.complete(prompt, kind=Kind.CODE, max_tokens=tokens)

        return complete

    async def chat(prompt: str) -> None:
        await zs.chat([{"role": "user", "content": prompt}], kind=Kind.CODE, max_tokens=tokens)

    return chat


class RawHttp:
    """A minimal HTTP/1.1 client: keep-alive connections, one per caller, no parsing beyond
    the status line and ``content-length``."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self._host, self._port = host, int(port)
        self._free: list[tuple[SocketStream, BufferedByteReceiveStream]] = []
        self._all: list[SocketStream] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self._host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        while self._free:
            stream, reader = self._free.pop()
            try:
                return await self._exchange(stream, reader, head + body)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
                # The server closed the idle connection (keep-alive timeout): take another.
                await stream.aclose()
        stream = await anyio.connect_tcp(self._host, self._port)
        self._all.append(stream)
        return await self._exchange(stream, BufferedByteReceiveStream(stream), head + body)

    async def _exchange(
        self, stream: SocketStream, reader: BufferedByteReceiveStream, request: bytes
    ) -> tuple[int, bytes]:
        await stream.send(request)
        response = await reader.receive_until(b"\r\n\r\n", 65536)
        status = int(response[9:12])
        match = re.search(rb"(?im)^content-length:\s*(\d+)", response)
        if match is None:
            raise SystemExit(f"no content-length in {response[:300]!r}")
        data = await reader.receive_exactly(int(match.group(1)))
        self._free.append((stream, reader))
        return status, data

    async def aclose(self) -> None:
        for stream in self._all:
            await stream.aclose()


def over_http(http: RawHttp, endpoint: str, tokens: int) -> Callable[[str], Awaitable[None]]:
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"

    async def call(prompt: str) -> None:
        body: dict[str, Any] = {"model": "code", "max_tokens": tokens}
        if endpoint == "completions":
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        status, data = await http.post(path, json.dumps(body).encode())
        if status != 200:
            raise SystemExit(f"POST {path}: HTTP {status}: {data[:500]!r}")
        json.loads(data)

    return call


def over_openai(
    client: openai.AsyncOpenAI, endpoint: str, tokens: int
) -> Callable[[str], Awaitable[None]]:
    if endpoint == "completions":

        async def complete(prompt: str) -> None:
            await client.completions.create(model="code", prompt=prompt, max_tokens=tokens)

        return complete

    async def chat(prompt: str) -> None:
        await client.chat.completions.create(
            model="code", messages=[{"role": "user", "content": prompt}], max_tokens=tokens
        )

    return chat


# -- one setup ----------------------------------------------------------------------------------


@dataclass
class Level:
    """Both contenders' runs at one endpoint and concurrency, round by round."""

    endpoint: str
    concurrency: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def add(self, contender: str, run: Run) -> None:
        self.runs.setdefault(contender, []).append(run)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _latency(latencies: Sequence[float]) -> LatencyStats:
    """Quantiles through zeta.testing's summaries, as every bench reports them."""
    records = [
        RequestRecord(i, 0.0, Kind.CODE, Priority.NORMAL, Outcome.OK, latency_s=latency)
        for i, latency in enumerate(latencies)
    ]
    return LatencyStats.of(records)


def summarize_level(level: Level) -> dict[str, Any]:
    contenders: dict[str, Any] = {}
    for name, runs in level.runs.items():
        stats = _latency([x for run in runs for x in run.latencies])
        contenders[name] = {
            "req_per_s": _spread([r.req_per_s for r in runs]),
            "p50_ms": stats.p50_s * 1e3,
            "p99_ms": stats.p99_s * 1e3,
        }
    versus: dict[str, Any] = {}
    for name in (HTTP, OPENAI):
        pairs = list(zip(level.runs[name], level.runs[INPROC], strict=True))
        added = [
            (_latency(h.latencies).p50_s - _latency(i.latencies).p50_s) * 1e3 for h, i in pairs
        ]
        versus[name] = {
            "ratio_req_per_s": _spread([h.req_per_s / i.req_per_s for h, i in pairs]),
            "p50_added_ms": _spread(added),
        }
    return {
        "endpoint": level.endpoint,
        "concurrency": level.concurrency,
        "contenders": contenders,
        "versus_in_process": versus,
    }


async def bench_setup(setup: Setup, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    top = max(args.concurrency)
    config = write_config(setup, directory, top)
    levels = [Level(e, c) for e in ENDPOINTS for c in args.concurrency]
    with zeta_serve(config) as url:
        raw = RawHttp(url)
        async with (
            Scheduler.from_config(config, seed=args.seed) as zs,
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
        ):
            calls: dict[tuple[str, str], Callable[[str], Awaitable[None]]] = {}
            for e in ENDPOINTS:
                calls[INPROC, e] = in_process(zs, e, args.tokens)
                calls[HTTP, e] = over_http(raw, e, args.tokens)
                calls[OPENAI, e] = over_openai(client, e, args.tokens)
            try:
                for call in calls.values():
                    await drive(call, [prompts(WARM_UP, args.seed - 1)])
                for r in range(args.rounds):
                    order = CONTENDERS[r % 3 :] + CONTENDERS[: r % 3]
                    for i, level in enumerate(levels):
                        n = level.concurrency
                        ps = prompts(max(setup.requests, n), args.seed * 1_000_003 + r * 1009 + i)
                        work = [ps[j::n] for j in range(n)]
                        for contender in order:
                            run = await drive(calls[contender, level.endpoint], work)
                            level.add(contender, run)
            finally:
                await raw.aclose()
    return {
        "setup": setup.name,
        "model": setup.model,
        "max_tokens": args.tokens,
        "requests_per_run": setup.requests,
        "levels": [summarize_level(level) for level in levels],
    }


# -- report -------------------------------------------------------------------------------------


def _fmt(s: dict[str, float], unit: str) -> str:
    if unit == "x":
        return f"{s['median']:5.2f}x [{s['min']:.2f}-{s['max']:.2f}]"
    if unit == "ms":
        return f"{s['median']:+6.2f} [{s['min']:+.2f}..{s['max']:+.2f}]"
    return f"{s['median']:7.0f} [{s['min']:.0f}-{s['max']:.0f}]"


def targets(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for result in results:
        for level in result["levels"]:
            if level["concurrency"] == 1:
                versus = level["versus_in_process"]
                added = versus[HTTP]["p50_added_ms"]["median"]
                checks.append(
                    {
                        "setup": result["setup"],
                        "endpoint": level["endpoint"],
                        "p50_added_ms": added,
                        "openai_p50_added_ms": versus[OPENAI]["p50_added_ms"]["median"],
                        "met": added <= TARGET_MS,
                    }
                )
    return checks


def report(result: dict[str, Any], rounds: int) -> Iterator[str]:
    yield (
        f"{result['setup']} ({result['model']}): max_tokens {result['max_tokens']}, "
        f"{result['requests_per_run']} requests per run; median [min-max] over {rounds} rounds"
    )
    yield (
        f"  {'endpoint':11s} {'conc':>4}  {'contender':11s} {'req/s':>20}  {'p50 ms':>8} "
        f"{'p99 ms':>8}  {'req/s vs in-process':>22}  {'p50 added ms':>22}"
    )
    for level in result["levels"]:
        for name, c in level["contenders"].items():
            line = (
                f"  {level['endpoint']:11s} {level['concurrency']:4d}  {name:11s} "
                f"{_fmt(c['req_per_s'], ''):>20}  {c['p50_ms']:8.3f} {c['p99_ms']:8.3f}"
            )
            versus = level["versus_in_process"].get(name)
            if versus is not None:
                line += (
                    f"  {_fmt(versus['ratio_req_per_s'], 'x'):>22}"
                    f"  {_fmt(versus['p50_added_ms'], 'ms'):>22}"
                )
            yield line


def _setups(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    if not names or not set(names) <= set(SETUPS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(SETUPS)}, got {text!r}")
    return names


def _levels(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,16, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 256:
        raise argparse.ArgumentTypeError(f"levels must be in 1..256, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench serve", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="coder-tiny instead of the coder")
    parser.add_argument(
        "--setups", type=_setups, default=list(SETUPS), help="zero-cost,coder (default both)"
    )
    parser.add_argument("--concurrency", type=_levels, default=[1, 16], help="callers per level")
    parser.add_argument("--requests", type=int, default=400, help="per run, zero-cost setup")
    parser.add_argument("--coder-requests", type=int, default=32, help="per run, coder setup")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (coder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object, last")
    args = parser.parse_args(argv)
    if min(args.requests, args.coder_requests, args.tokens, args.rounds, args.threads) < 1:
        parser.error("--requests, --coder-requests, --tokens, --rounds, --threads must be >= 1")

    results = []
    with tempfile.TemporaryDirectory(prefix="zeta-bench-serve-") as tmp:
        for setup in setups(args):
            if setup.name not in args.setups:
                continue
            results.append(anyio.run(bench_setup, setup, args, Path(tmp)))
    for result in results:
        for line in report(result, args.rounds):
            print(line)
    checks = targets(results)
    for check in checks:
        verdict = "met" if check["met"] else "NOT met"
        print(
            f"target (http adds <= {TARGET_MS:g} ms at p50, 1 caller) {check['setup']}/"
            f"{check['endpoint']}: {check['p50_added_ms']:+.2f} ms, {verdict} "
            f"(through the openai client: {check['openai_p50_added_ms']:+.2f} ms)"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "suite": "serve",
                    "seed": args.seed,
                    "rounds": args.rounds,
                    "python": sys.version.split()[0],
                    "results": results,
                    "targets": checks,
                    "target_met": all(c["met"] for c in checks),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
