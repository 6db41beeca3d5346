"""Continuous batching on llama.cpp: zeta against one request at a time and a bare batched loop.

``python -m bench llama [--tiny] [--models coder,reasoner] [--in-flight 1,4,8,16] [--waves W]
[--tokens T] [--slots S|in-flight] [--rounds R] [--threads N] [--llama-server PATH] [--seed S]
[--json]``

For each ladder model and each level N of requests in flight, N callers each send W requests one
after another (greedy, exactly T tokens each, seeded prompts of 16 to 40 words) to each
contender, the same model file and ``--threads`` llama.cpp threads each (default: the host's
cores, as one model alone on the host would be run; only one contender runs at a time), all in
this process but llama-server:

* ``zeta``: ``Scheduler.complete`` on a context of S slots (default 16; ``--slots in-flight``
  gives S = N), which decodes up to S requests together;
* ``zeta slots=1``: the same scheduler on a one-slot context: one request at a time;
* ``bare loop``: llama.cpp's C API driven directly, no scheduler, no streaming, no text: one
  ``llama_decode`` per step over the N sequences, each refilled with the caller's next prompt as
  it ends, greedy. The same context layout as zeta's (unified KV, ``n_ctx`` cells per sequence)
  at the same batch size: the ceiling;
* ``llama-server -np N`` (optional): llama.cpp's own server with N slots, over HTTP, when a
  binary is on ``PATH`` or given with ``--llama-server``; skipped otherwise.

Only one contender holds a llama.cpp thread at a time: each zeta run gets a fresh scheduler
(closed after it) and each bare-loop run a thread of its own that ends with it. llama.cpp's
OpenMP runtime (libgomp) counts the worker threads of every thread that ever decoded and, when
they outnumber the CPUs, stops spinning between the threads' barriers: on a 2-core machine two
idle contexts' thread pools in the process slow a third by a quarter to a third. llama-server,
in a process of its own, never paid that; the in-process contenders must not either.

Rounds interleave: every round runs every contender at every level, in an order rotated per
round, so drift on a shared machine hits all of them alike. Each round uses fresh prompts, so no
contender finds the last round's prompts in its cache. Reported per level: generated tokens per
second (median, and min-max over rounds), p50 and p99 request latency (over every round's
requests), and the ratios zeta / (zeta slots=1) and zeta / (bare loop), paired within each round
(median and min-max).

Targets: at 8 in flight, zeta at least 3x slots=1 on the coder and 4.5x on the reasoner, and at
least 85% of the bare loop and at least llama-server's throughput; at 1 in flight, within 3% of
slots=1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import anyio

from zeta import Kind, ModelSpec, Outcome, Priority, Scheduler
from zeta.backends.llama_cpp import _llama
from zeta.testing import LatencyStats, RequestRecord, ladder_spec

WORDS = "def return value data model import class self list dict the answer because".split()
ZETA, SINGLE, BARE, SERVER = "zeta", "zeta slots=1", "bare loop", "llama-server"


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(16, 40))) for _ in range(n)]


@dataclass
class Run:
    """One contender at one level in one round."""

    seconds: float
    tokens: int
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def drive(call: Callable[[str], Awaitable[int]], work: Sequence[Sequence[str]]) -> Run:
    """Closed loop: one caller per entry of ``work``, each sending its prompts one by one."""
    latencies: list[float] = []
    tokens = 0

    async def caller(mine: Sequence[str]) -> None:
        nonlocal tokens
        for prompt in mine:
            t0 = time.perf_counter()
            n = await call(prompt)  # not ``tokens += await ...``: that reads tokens before
            tokens += n
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for mine in work:
            tg.start_soon(caller, mine)
    return Run(time.perf_counter() - t0, tokens, latencies)


# -- the bare loop ----------------------------------------------------------------------------


class BareLoop:
    """N sequences decoded together by llama.cpp's C API, refilled as they end: no scheduler."""

    def __init__(self, spec: ModelSpec, n_seq: int) -> None:
        lib = self.lib = _llama()  # zeta's loader: llama.cpp's log goes to Python logging
        assert spec.path is not None
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(os.fsencode(spec.path), mparams)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = spec.n_ctx * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True
        cparams.n_batch = cparams.n_ubatch = self.n_batch = max(512, n_seq)
        cparams.n_threads = cparams.n_threads_batch = spec.n_threads
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.model or not self.ctx:
            raise SystemExit(f"bare loop: llama.cpp could not open {spec.path}")
        self.mem = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.greedy = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(self.greedy, lib.llama_sampler_init_greedy())

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        return list(buf[:n])

    def run(self, work: Sequence[Sequence[list[int]]], tokens: int) -> Run:
        """Each sequence ``i`` runs ``work[i]``'s prompts one after another, ``tokens`` each."""
        lib, batch, ctx = self.lib, self.batch, self.ctx
        lib.llama_memory_clear(self.mem, True)
        queues = [list(mine) for mine in work]
        # Per sequence: prompt, prompt tokens fed, tokens generated, next token, start, logits row
        seqs: list[list[Any]] = [[q.pop(0), 0, 0, -1, 0.0, -1] for q in queues]
        latencies: list[float] = []
        generated = 0
        t0 = time.perf_counter()
        for s in seqs:
            s[4] = t0
        active = set(range(len(seqs)))
        while active:
            n = 0
            for i in active:  # one token for each decoding sequence
                s = seqs[i]
                if s[3] >= 0:
                    pos = len(s[0]) + s[2] - 1
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = s[3], pos, 1
                    batch.seq_id[n][0], batch.logits[n] = i, 1
                    s[5] = n
                    n += 1
            for i in active:  # prompt tokens for the others, as many as the batch takes
                s = seqs[i]
                prompt, fed = s[0], s[1]
                while s[3] < 0 and fed < len(prompt) and n < self.n_batch:
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = prompt[fed], fed, 1
                    batch.seq_id[n][0], batch.logits[n] = i, fed == len(prompt) - 1
                    if fed == len(prompt) - 1:
                        s[5] = n
                    fed += 1
                    n += 1
                s[1] = fed
            batch.n_tokens = n
            if lib.llama_decode(ctx, batch) != 0:
                raise SystemExit("bare loop: llama_decode failed")
            now = time.perf_counter()
            for i in list(active):
                s = seqs[i]
                if s[5] < 0:
                    continue
                s[3] = lib.llama_sampler_sample(self.greedy, ctx, s[5])
                s[5] = -1
                s[2] += 1
                generated += 1
                if s[2] == tokens:
                    latencies.append(now - s[4])
                    lib.llama_memory_seq_rm(self.mem, i, -1, -1)
                    if queues[i]:
                        seqs[i] = [queues[i].pop(0), 0, 0, -1, now, -1]
                    else:
                        active.discard(i)
        return Run(time.perf_counter() - t0, generated, latencies)

    def close(self) -> None:
        lib = self.lib
        lib.llama_sampler_free(self.greedy)
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)


# -- llama-server -----------------------------------------------------------------------------


class LlamaServer:
    """``llama-server -np N`` on a free local port, driven over HTTP."""

    def __init__(self, binary: str, spec: ModelSpec, n_seq: int) -> None:
        assert spec.path is not None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [
            binary, "-m", spec.path, "-np", str(n_seq), "-c", str(spec.n_ctx * n_seq),
            "-t", str(spec.n_threads), "-tb", str(spec.n_threads), "-ngl", "0",
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        # Its log goes to a file: a pipe nobody reads fills up and stalls the server's logging
        # (and with it the server), which once made it look 40x slower than it is.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log
        )
        deadline = time.monotonic() + 120.0
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise RuntimeError(f"exited with status {self.proc.returncode}: {err[-300:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("not healthy within 120 s")
            time.sleep(0.25)

    def complete(self, prompt: str, tokens: int) -> int:
        body = {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "ignore_eos": True}
        request = urllib.request.Request(
            f"{self.url}/completion",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600.0) as r:
            return int(json.load(r)["tokens_predicted"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def alone(fn: Callable[..., Run], *args: Any) -> Run:
    """``fn(*args)`` on a thread of its own that ends with it (see the module docstring: its
    llama.cpp threads end with it too)."""
    with ThreadPoolExecutor(1, thread_name_prefix="bench-bare-loop") as pool:
        return pool.submit(fn, *args).result()


def find_llama_server(given: str | None) -> str | None:
    if given:
        return given if os.access(given, os.X_OK) else None
    return shutil.which("llama-server")


# -- one model ----------------------------------------------------------------------------------


@dataclass
class Level:
    """Every contender's runs at one level, round by round."""

    in_flight: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def add(self, contender: str, run: Run) -> None:
        self.runs.setdefault(contender, []).append(run)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _latency(runs: Sequence[Run]) -> LatencyStats:
    """Quantiles through zeta.testing's summaries, as every bench reports them."""
    records = [
        RequestRecord(i, 0.0, Kind.CODE, Priority.NORMAL, Outcome.OK, latency_s=latency)
        for i, latency in enumerate(x for run in runs for x in run.latencies)
    ]
    return LatencyStats.of(records)


def summarize_level(level: Level) -> dict[str, Any]:
    contenders: dict[str, Any] = {}
    for name, runs in level.runs.items():
        stats = _latency(runs)
        contenders[name] = {
            "tokens_per_s": _spread([r.tokens_per_s for r in runs]),
            "p50_s": stats.p50_s,
            "p99_s": stats.p99_s,
        }
    ratios: dict[str, Any] = {}
    for label, base in (
        (f"{ZETA}/{SINGLE}", SINGLE),
        (f"{ZETA}/{BARE}", BARE),
        (f"{ZETA}/{SERVER}", SERVER),
    ):
        if ZETA in level.runs and base in level.runs:
            pairs = zip(level.runs[ZETA], level.runs[base], strict=True)
            ratios[label] = _spread([a.tokens_per_s / b.tokens_per_s for a, b in pairs])
    return {"in_flight": level.in_flight, "contenders": contenders, "ratios": ratios}


async def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    levels = [Level(n) for n in args.in_flight]
    top = max(args.in_flight)

    def spec(slots: int) -> ModelSpec:
        return ladder_spec(
            name, name=name, n_threads=args.threads, kinds=frozenset({Kind.CODE}), slots=slots
        )

    skipped: dict[str, str] = {}
    server_binary = find_llama_server(args.llama_server)
    if server_binary is None:
        skipped[SERVER] = f"no binary ({args.llama_server or 'llama-server not on PATH'})"
    async with contextlib.AsyncExitStack() as stack:
        bare = BareLoop(spec(top), top)
        stack.callback(bare.close)
        servers: dict[int, LlamaServer] = {}

        def server(n: int) -> LlamaServer | None:
            if server_binary is None or SERVER in skipped:
                return None
            if n not in servers:
                try:
                    servers[n] = LlamaServer(server_binary, spec(n), n)
                except (OSError, RuntimeError) as exc:
                    skipped[SERVER] = str(exc)
                    return None
                stack.callback(servers[n].close)
            return servers[n]

        async def run_contender(contender: str, n: int, work: list[list[str]]) -> Run | None:
            tokens = args.tokens
            if contender == ZETA:
                slots = n if args.slots == "in-flight" else int(args.slots)
            elif contender == SINGLE:
                slots = 1
            elif contender == BARE:
                ids = [[bare.tokenize(p) for p in mine] for mine in work]
                return await anyio.to_thread.run_sync(alone, bare.run, ids, tokens)
            else:
                srv = server(n)
                if srv is None:
                    return None

                async def via_http(prompt: str) -> int:
                    return await anyio.to_thread.run_sync(srv.complete, prompt, tokens)

                return await drive(via_http, work)

            # A fresh scheduler per run: its worker thread (and llama.cpp's threads with it) ends
            # when it closes, before the next contender runs.
            async with Scheduler(models=[spec(slots)], policy="dynamic", seed=args.seed) as zs:
                await zs.complete("warm up", kind=Kind.CODE, max_tokens=2)

                async def via_zeta(prompt: str) -> int:
                    result = await zs.complete(prompt, kind=Kind.CODE, max_tokens=tokens)
                    return result.completion_tokens

                return await drive(via_zeta, work)

        contenders = [ZETA, SINGLE, BARE, SERVER]
        for r in range(args.rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for level in levels:
                n = level.in_flight
                ps = prompts(n * args.waves, args.seed * 1_000_003 + r * 1009 + n)
                work = [ps[i::n] for i in range(n)]
                for contender in order:
                    run = await run_contender(contender, n, work)
                    if run is None:
                        continue
                    expected = n * args.waves * args.tokens
                    if run.tokens != expected:
                        raise SystemExit(
                            f"{contender}: generated {run.tokens}, expected {expected}"
                        )
                    level.add(contender, run)
    return {
        "model": name,
        "tokens_per_request": args.tokens,
        "requests_per_caller": args.waves,
        "rounds": args.rounds,
        "slots": args.slots,
        "levels": [summarize_level(level) for level in levels],
        "skipped": skipped,
    }


# -- report -----------------------------------------------------------------------------------


def _fmt(s: dict[str, float], unit: str = "") -> str:
    if unit == "x":
        return f"{s['median']:5.2f}x [{s['min']:.2f}-{s['max']:.2f}]"
    return f"{s['median']:7.0f} [{s['min']:.0f}-{s['max']:.0f}]"


def report(result: dict[str, Any]) -> Iterator[str]:
    yield (
        f"{result['model']}: {result['tokens_per_request']} tokens per request, "
        f"{result['requests_per_caller']} per caller, zeta with slots={result['slots']}; "
        f"median [min-max] over {result['rounds']} rounds"
    )
    yield f"  {'in flight':>9}  {'contender':16s} {'tokens/s':>22}  {'p50 s':>7} {'p99 s':>7}"
    for level in result["levels"]:
        for name, c in level["contenders"].items():
            yield (
                f"  {level['in_flight']:9d}  {name:16s} {_fmt(c['tokens_per_s']):>22}  "
                f"{c['p50_s']:7.3f} {c['p99_s']:7.3f}"
            )
        ratios = "  ".join(f"{k} {_fmt(v, 'x')}" for k, v in level["ratios"].items())
        yield f"  {'':9}  ratios: {ratios}"
    for name, why in result["skipped"].items():
        yield f"  {name}: skipped ({why})"


def _levels(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,8, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 256:
        raise argparse.ArgumentTypeError(f"levels must be in 1..256, got {text!r}")
    return values


def _slots(text: str) -> str:
    if text != "in-flight" and not (text.isdigit() and 1 <= int(text) <= 256):
        raise argparse.ArgumentTypeError(f"expected 1..256 or 'in-flight', got {text!r}")
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench llama", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--models", help="ladder models (default coder,reasoner)")
    parser.add_argument("--tiny", action="store_true", help="the *-tiny models, for quick runs")
    parser.add_argument("--in-flight", type=_levels, default=[1, 4, 8, 16], help="levels")
    parser.add_argument("--waves", type=int, default=2, help="requests per caller")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--slots", type=_slots, default="16", help="zeta's slots, or in-flight")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads per context (default: the host's cores)",
    )
    parser.add_argument("--llama-server", help="llama-server binary (default: from PATH)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object, last")
    args = parser.parse_args(argv)
    if args.waves < 1 or args.tokens < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--waves, --tokens, --rounds and --threads must be at least 1")
    if args.slots != "in-flight" and int(args.slots) < max(args.in_flight):
        parser.error(f"--slots {args.slots} is fewer than {max(args.in_flight)} in flight")
    names = args.models or ("coder-tiny,reasoner-tiny" if args.tiny else "coder,reasoner")

    results = [anyio.run(bench_model, name, args) for name in names.split(",")]
    for result in results:
        for line in report(result):
            print(line)
    if args.json:
        print(json.dumps({"suite": "llama", "seed": args.seed, "results": results}))
    return 0
