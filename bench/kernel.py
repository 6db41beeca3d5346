"""Scoring-kernel micro-benchmark: nanoseconds per routing decision, compiled vs reference.

    python -m bench kernel [--seed S] [--json] [--repeat R]

For N = 2, 3, 8, 32 and 128 candidates it times, in one process on identical random tables
(each row a context with 1, 2, 4 or 8 slots, some free, some full, some with a queue, on one of
three devices with a measured co-load slowdown, so the harm terms are priced):

- ``c choose``: the compiled ``ScoreTable.choose(kind, est_tokens)`` called once per message
  from a Python loop (what the router does per message; the loop's own cost is included);
- ``py choose``: the pure-Python reference ``ScoreTable.choose``, per message.

Each figure is the best of ``--repeat`` runs (garbage collector off while timing). Before timing,
both kernels must make the same decisions on the same messages. With ``--json`` the last line
of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from zeta import _scoring_c, _scoring_py

SIZES = (2, 3, 8, 32, 128)
N_KINDS = 4
#: Messages per timed run: enough for tens of milliseconds per run.
MESSAGES_C = 100_000
MESSAGES_PY = 5_000
#: Slots a row's context may have (continuous batching) and its step-time slope.
SLOTS = (1, 2, 4, 8)
STEP_SLOPES = (0.07, 0.15, 0.2)
#: Devices the rows share, and the co-load slowdowns measured (H100: 0.24..0.94; 2 CPU cores: 1).
DEVICES = 3
CO_SLOWS = (0.24, 0.59, 0.94, 1.0)
#: Target from the design: compiled per-message >= 20x the reference (N=8).
TARGET_SPEEDUP_AT_8 = 20.0


def _state(
    rng: random.Random, n: int, batch_rng: random.Random, device_rng: random.Random
) -> dict[str, Any]:
    """A plausible live state: most candidates capable and up, some queued work, varied speed.

    Slots and step slopes come from ``batch_rng``, devices and co-load slowdowns from
    ``device_rng``, so the other fields and the messages are those of the benchmark before
    batching and devices (its figures stay comparable).
    """
    capable = [[rng.random() < 0.75 for _ in range(N_KINDS)] for _ in range(n)]
    for k in range(N_KINDS):  # every kind servable somewhere
        capable[rng.randrange(n)][k] = True
    return {
        "capable": capable,
        "penalty": [[rng.choice((0.0, 0.0, 0.25, 1.0)) for _ in range(N_KINDS)] for _ in range(n)],
        "available": [rng.random() < 0.95 for _ in range(n)],
        "load": [(rng.randrange(9), rng.randrange(3)) for _ in range(n)],
        "ewma": [(rng.uniform(0.02, 2.0), rng.uniform(0.002, 0.05)) for _ in range(n)],
        "util": [rng.uniform(0.0, 0.9) for _ in range(n)],
        "slots": [batch_rng.choice(SLOTS) for _ in range(n)],
        "step_slope": [batch_rng.choice(STEP_SLOPES) for _ in range(n)],
        "device": [device_rng.randrange(DEVICES) for _ in range(n)],
        "co_slow": [device_rng.choice(CO_SLOWS) for _ in range(n)],
    }


def _table(kernel: Any, state: dict[str, Any], seed: int) -> Any:
    n = len(state["util"])
    t = kernel.ScoreTable(n, N_KINDS, seed=seed, tau=5.0, weight=1.0)
    for i in range(n):
        for k in range(N_KINDS):
            t.set_capability(i, k, state["capable"][i][k], state["penalty"][i][k])
        t.set_available(i, state["available"][i])
        t.set_slots(i, state["slots"][i])
        t.set_step_slope(i, state["step_slope"][i])
        t.set_load(i, *state["load"][i])
        t.set_device(i, state["device"][i])
        t.set_co_slow(i, state["co_slow"][i])
        t.observe(i, *state["ewma"][i], 0.0)  # a new row's first observation sets it exactly
        t.set_util(i, state["util"][i])
    return t


def _best_ns(run: Callable[[], int], repeat: int) -> float:
    """Best nanoseconds per message over ``repeat`` runs; ``run`` returns its message count."""
    best = float("inf")
    for _ in range(repeat):
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter_ns()
            count = run()
            elapsed = time.perf_counter_ns() - start
        finally:
            if gc_was_enabled:
                gc.enable()
        best = min(best, elapsed / count)
    return best


def _per_message(
    choose: Callable[[int, float], int], kinds: list[int], ests: list[float]
) -> Callable[[], int]:
    """A run that makes one ``choose`` call per message from a plain Python loop."""

    def run() -> int:
        for k, e in zip(kinds, ests, strict=True):
            choose(k, e)
        return len(kinds)

    return run


def measure(n: int, seed: int, repeat: int) -> dict[str, float]:
    """Figures for ``n`` candidates."""
    rng = random.Random(seed * 1_000_003 + n)
    state = _state(rng, n, random.Random(seed * 1_000_033 + n), random.Random(seed * 1_000_037 + n))
    kinds = [rng.randrange(N_KINDS) for _ in range(MESSAGES_C)]
    ests = [float(rng.choice((16, 64, 128, 256, 512, 2048))) for _ in range(MESSAGES_C)]

    c_table = _table(_scoring_c, state, seed)
    py_table = _table(_scoring_py, state, seed)
    for k, e in zip(kinds[:500], ests[:500], strict=True):
        if c_table.choose(k, e) != py_table.choose(k, e):
            raise AssertionError(f"compiled and reference kernels disagree at N={n}")

    c_choose = _best_ns(_per_message(c_table.choose, kinds, ests), repeat)
    py_run = _per_message(py_table.choose, kinds[:MESSAGES_PY], ests[:MESSAGES_PY])
    py_choose = _best_ns(py_run, repeat)
    return {
        "n": n,
        "c_choose_ns": round(c_choose, 1),
        "py_choose_ns": round(py_choose, 1),
        "speedup_choose": round(py_choose / c_choose, 1),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench kernel", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0, help="random state and messages (default 0)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs, best kept (default 5)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    rows = [measure(n, args.seed, args.repeat) for n in SIZES]
    at8 = next(r for r in rows if r["n"] == 8)
    targets = {
        "speedup_choose_at_8": {
            "want": f">= {TARGET_SPEEDUP_AT_8:g}x",
            "got": at8["speedup_choose"],
            "met": at8["speedup_choose"] >= TARGET_SPEEDUP_AT_8,
        },
    }

    print(
        f"zeta scoring kernel: ns per decision, best of {args.repeat} "
        f"(seed {args.seed}, {N_KINDS} kinds, Python {platform.python_version()}, "
        f"{platform.machine()})"
    )
    header = ("N", "c choose", "py choose", "py/c choose")
    print("{:>5} {:>10} {:>11} {:>12}".format(*header))
    for r in rows:
        print(
            f"{r['n']:>5} {r['c_choose_ns']:>10.1f} {r['py_choose_ns']:>11.1f} "
            f"{r['speedup_choose']:>11.1f}x"
        )
    for name, t in targets.items():
        print(
            f"target {name}: want {t['want']}, got {t['got']} -> {'met' if t['met'] else 'MISSED'}"
        )

    if args.json:
        print(
            json.dumps(
                {
                    "suite": "kernel",
                    "unit": "ns/decision",
                    "seed": args.seed,
                    "repeat": args.repeat,
                    "n_kinds": N_KINDS,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "results": rows,
                    "targets": targets,
                },
                separators=(",", ":"),
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
