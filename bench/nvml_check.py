"""Check on a GPU machine that zeta's NVML sampler reads utilisation and sees it rise under load.

    python -m bench.nvml_check [--device 0] [--idle 3] [--load 10] [--interval 0.25] [--json]

Samples every visible GPU through :class:`zeta.telemetry.NvmlDevices` and, through
:class:`zeta.telemetry.DeviceSampler`, the utilisation an actor placed on ``--device`` would be
given, in three phases: idle, under a PyTorch matmul load on ``--device`` (skipped with
``--load 0`` or without torch/CUDA), and after. Prints one line per sample and a summary; the last
line is JSON with ``--json``. Exit status: 0 when the load phase's mean utilisation exceeds the
idle phase's by at least 0.2 (or no load was run), 1 when it does not, 2 without NVML.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

from zeta._snapshot import ActorState, ModelSnapshot
from zeta.telemetry import DeviceSampler, NvmlDevices

GiB = 2**30


def gpu_load(
    device: int, stop: threading.Event, started: threading.Event, out: dict[str, Any]
) -> None:
    """Run fp16 matmuls on ``device`` until ``stop`` is set."""
    try:
        import torch

        dev = torch.device(f"cuda:{device}")
        a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
        torch.cuda.synchronize(dev)
        out["torch"] = torch.__version__
        out["gpu_name"] = torch.cuda.get_device_name(dev)
        started.set()
        n = 0
        while not stop.is_set():
            for _ in range(8):
                a @ b
            torch.cuda.synchronize(dev)
            n += 8
        out["matmuls"] = n
    except Exception as exc:  # no torch, no CUDA: report, and the check runs without load
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        started.set()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nvml_check", description=__doc__)
    ap.add_argument("--device", type=int, default=0, help="CUDA device index to load")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds sampled before the load")
    ap.add_argument("--load", type=float, default=10.0, help="seconds of GPU load (0: none)")
    ap.add_argument("--after", type=float, default=2.0, help="seconds sampled after the load")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args(argv)

    devices = NvmlDevices()
    sampler = DeviceSampler(gpus=devices)
    probe = ModelSnapshot(
        name="probe", replica=0, device=args.device, state=ActorState.READY, queue_len=0,
        in_flight=0, ewma_request_s=0.0, ewma_token_s=0.0, utilisation=0.0, busy_s=0.0,
        restarts=0, completed=0, failed=0,
    )  # fmt: skip
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def sample_for(seconds: float, phase: str) -> None:
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            [actor_util] = sampler.sample([probe], now)
            readings = sampler.device_readings()
            for index, r in sorted(readings.items()):
                samples.append(
                    {"t": round(now - t0, 3), "phase": phase, "device": index,
                     "utilisation": r.utilisation, "memory_used_bytes": r.memory_used_bytes,
                     "memory_total_bytes": r.memory_total_bytes, "actor_utilisation": actor_util}
                )  # fmt: skip
                mark = (
                    f"  <- an actor on gpu{index} gets {actor_util:.1%}"
                    if index == args.device
                    else ""
                )
                print(
                    f"{now - t0:7.2f}s {phase:5s} gpu{index} util {r.utilisation:6.1%} "
                    f"mem {r.memory_used_bytes / GiB:6.2f}/{r.memory_total_bytes / GiB:.2f} GiB{mark}",
                    flush=True,
                )
            if now >= end:
                return
            time.sleep(args.interval)

    sample_for(0.0, "init")
    if not devices.available:
        print("NVML unavailable (see the warning above); zeta falls back to busy fractions.")
        if args.json:
            print(json.dumps({"nvml": False}))
        return 2
    sample_for(args.idle, "idle")
    load_info: dict[str, Any] = {}
    if args.load > 0:
        stop, started = threading.Event(), threading.Event()
        worker = threading.Thread(target=gpu_load, args=(args.device, stop, started, load_info))
        worker.start()
        started.wait()
        if "error" in load_info:
            print(f"no GPU load: {load_info['error']}")
        else:
            sample_for(args.load, "load")
        stop.set()
        worker.join()
        sample_for(args.after, "after")
    devices.close()

    def mean(phase: str) -> float | None:
        xs = [
            s["utilisation"] for s in samples if s["phase"] == phase and s["device"] == args.device
        ]
        return statistics.fmean(xs) if xs else None

    summary = {
        "nvml": True,
        "device": args.device,
        "devices": sorted({s["device"] for s in samples}),
        "idle_mean": mean("idle"),
        "load_mean": mean("load"),
        "load_max": max(
            (
                s["utilisation"]
                for s in samples
                if s["phase"] == "load" and s["device"] == args.device
            ),
            default=None,
        ),
        "after_mean": mean("after"),
        "actor_matches_device": all(
            s["actor_utilisation"] == s["utilisation"]
            for s in samples
            if s["device"] == args.device
        ),
        **load_info,
    }
    idle, load = summary["idle_mean"], summary["load_mean"]
    rises = idle is not None and load is not None and load >= idle + 0.2
    summary["rises_under_load"] = rises
    print(
        f"device {args.device}: idle {idle if idle is None else f'{idle:.1%}'}, "
        f"load {load if load is None else f'{load:.1%}'} -> "
        + ("rises under load" if rises else "no load run" if load is None else "DID NOT RISE")
    )
    if args.json:
        print(json.dumps(summary))
    return 0 if rises or load is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
