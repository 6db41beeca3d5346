"""Dispatch ``python -m bench NAME ...`` to ``bench/NAME.py``'s ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "kernel": "scoring kernel: ns per decision, compiled vs reference",
    "overhead": "scheduler overhead vs a bare queue+thread baseline",
    "llama": "zeta vs direct llama-cpp-python on a generated model",
    "policies": "A/B comparison of routing policies on synthetic workloads",
    "serve": "zeta serve over HTTP vs the same calls in process",
    "calibration": "the feedback calibrator in the simulator: with vs without, shifts",
    "simreal": "sim-to-real: one trace on the real ladder and in the simulator",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUITES:
        print("usage: python -m bench {" + ",".join(SUITES) + "} [--seed S] [--json]")
        for name, what in SUITES.items():
            print(f"  {name:10s} {what}")
        return 2
    module = importlib.import_module(f"bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
