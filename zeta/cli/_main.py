"""The ``zeta`` command: ``zeta demo``, ``zeta serve``, ``zeta profile``,
``zeta models make|list``, ``zeta config check FILE``.

Also runs as ``python -m zeta``. Heavy imports (llama.cpp, rich, the scheduler) happen inside the
subcommand that needs them, so ``zeta --help`` is instant.

``zeta demo`` prints only its own display unless asked for more: ``--log-level``/``--log-json``
turn zeta's structured logs on (stderr), ``--metrics-port`` serves Prometheus metrics while it
runs (on 127.0.0.1 unless ``--metrics-host`` says otherwise).

``zeta serve --config FILE`` runs the OpenAI-compatible HTTP API (:mod:`zeta.serve`) until SIGINT
or SIGTERM; it prints its URL once it serves, and logs only when asked (``--log-level``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .._exceptions import ConfigError, ZetaError
from .._types import SCORING_FIELDS, Scoring

__all__ = ["build_parser", "main"]


def _models_make(args: argparse.Namespace) -> int:
    from .. import _ladder

    names = args.names or [n for n in _ladder.LADDER if args.tiny or not n.endswith("-tiny")]
    for name in names:
        path = _ladder.make_model(name, seed=args.seed, directory=args.dir, force=args.force)
        m = _ladder.LADDER[name]
        size = path.stat().st_size / 1e6
        print(f"{name:14s} {m.n_params / 1e6:6.1f}M params {size:7.1f} MB  {path}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from .. import _ladder

    for name, m in _ladder.LADDER.items():
        path = _ladder.model_path(name, seed=args.seed, directory=args.dir)
        state = "cached" if path.is_file() else "not generated"
        print(f"{name:14s} {m.role:9s} {m.n_params / 1e6:6.1f}M params  {state:13s} {path}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from .._config import load_config

    config = load_config(args.file, make_models=False)
    print(f"{args.file}: ok, policy {config.policy!r}, {len(config.models)} models")
    for m in config.models:
        kinds = ",".join(sorted(k.value for k in m.kinds))
        optional = " (optional)" if m.name in config.optional else ""
        print(f"  {m.name}: {kinds} x{m.replicas} {m.path or m.backend}{optional}")
    serve = config.serve
    key = "in the file" if serve.api_key is not None else f"from ${serve.api_key_env} if set"
    print(f"  zeta serve: {serve.host}:{serve.port}, API key {key}")
    return 0


def _scoring(items: Sequence[str]) -> Scoring:
    """The scoring parameters ``--set KEY=NUMBER`` asks for, over the library's defaults.

    Raises:
        ConfigError: an item is not ``KEY=NUMBER`` with a scoring parameter as KEY, or a value
            is out of range.
    """
    changes: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            changes[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or key not in SCORING_FIELDS:
            raise ConfigError(
                f"--set takes KEY=NUMBER with KEY one of {list(SCORING_FIELDS)}, got {item!r}"
            )
    try:
        return Scoring().replace(changes)
    except ConfigError as exc:
        raise exc.under("--set") from None


def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoMetrics, DemoOptions, run_demo

    options = DemoOptions(
        duration_s=args.duration,
        seed=args.seed,
        policies=tuple(args.policies.split(",")),
        live=not args.no_live,
        directory=args.dir,
        tiny=args.tiny,
        scoring=_scoring(args.set),
    )
    if args.log_level is not None or args.log_json:
        from ..telemetry import configure_logging

        # --log-level alone: JSON lines unless stderr is a terminal.
        configure_logging(json=True if args.log_json else None, level=args.log_level or "INFO")
    metrics: DemoMetrics | None = None
    server = None
    if args.metrics_port is not None:
        from ..telemetry import serve_metrics

        metrics = DemoMetrics()
        try:
            server = serve_metrics(metrics, args.metrics_host, args.metrics_port)
        except OSError as exc:
            where = f"{args.metrics_host}:{args.metrics_port}"
            raise ConfigError(
                f"cannot serve metrics on {where}: {exc.strerror or exc}", key="--metrics-port"
            ) from None
        print(f"zeta demo: serving Prometheus metrics at {server.url}", flush=True)
    try:
        report = run_demo(options, metrics=metrics)
    finally:
        if server is not None:
            server.close()
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .._config import load_config

    config = load_config(args.config)
    key = config.serve.resolve_api_key() is not None  # an invalid key fails here, unshown
    if args.log_level is not None or args.log_json:
        from ..telemetry import configure_logging

        configure_logging(json=True if args.log_json else None, level=args.log_level or "INFO")
    else:
        # uvicorn's own messages (a request cancelled when shutdown's grace period ends, ...)
        # stay quiet like zeta's unless logs are asked for; logging's last resort would print
        # them with a traceback.
        logging.getLogger("uvicorn").addHandler(logging.NullHandler())
    from ..serve import serve

    names = ", ".join(m.name for m in config.models)

    def announce(url: str) -> None:
        auth = "; requests need the API key" if key else ""
        print(f"zeta serve: {url}/v1 (models: {names}){auth}; Ctrl-C stops", flush=True)

    serve(config, host=args.host, port=args.port, announce=announce, profile=args.profile)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from .._config import load_config
    from ..sim._measure import fleet_toml, measure_fleet

    if args.rounds < 1 or args.steps < 1:
        print("zeta: error: --rounds and --steps must be at least 1", file=sys.stderr)
        return 2
    config = load_config(args.config)
    fleet = measure_fleet(
        config.models,
        rounds=args.rounds,
        steps=args.steps,
        coload=not args.no_coload,
        report=lambda line: print(line, file=sys.stderr, flush=True),
    )
    text = fleet_toml(fleet)
    if args.out is None:
        print(text, end="")
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"zeta profile: wrote {args.out}", file=sys.stderr)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is an integer from 0 to 65535, got {text!r}")
    return port


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=None,
        help="log zeta's events at this level and up to stderr (default: no logs)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="log as JSON lines (at INFO unless --log-level says otherwise)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``zeta`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="zeta", description="Load-aware scheduling of LLM requests across local models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run a bursty agent workload on three generated models, static vs dynamic routing",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds in all (default: as long as 200 requests per phase and policy take)",
    )
    demo.add_argument("--seed", type=int, default=0, help="workload and model seed (default 0)")
    demo.add_argument(
        "--policies", default="static,dynamic", help="policies to compare (default static,dynamic)"
    )
    demo.add_argument("--json", action="store_true", help="print the results as JSON, last")
    demo.add_argument("--no-live", action="store_true", help="no live progress display")
    demo.add_argument("--dir", default=None, help="model cache directory")
    demo.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=NUMBER",
        help=f"scoring parameter for every policy ({', '.join(SCORING_FIELDS)}), "
        "e.g. spill_penalty=0.5 (repeatable)",
    )
    demo.add_argument(
        "--tiny", action="store_true", help="use the tiny test models (fast, small contrast)"
    )
    demo.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port while the demo runs (0: any free port)",
    )
    demo.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 only on a trusted network)",
    )
    _log_arguments(demo)
    demo.set_defaults(func=_demo)

    serve = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API (chat, completions, embeddings) over a config",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    serve.add_argument(
        "--host",
        default=None,
        metavar="HOST",
        help="address to bind (default: [serve] host, 127.0.0.1; 0.0.0.0 only on a trusted "
        "network, with an API key)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=None,
        metavar="PORT",
        help="TCP port (default: [serve] port, 8000)",
    )
    serve.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="a `zeta profile` file: its measurements seed the routing estimates",
    )
    _log_arguments(serve)
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="the generated model ladder")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    make = msub.add_parser("make", help="generate ladder models (cached; skips existing files)")
    make.add_argument("names", nargs="*", help="models to make (default: the three roles)")
    make.add_argument("--tiny", action="store_true", help="also the *-tiny test models")
    make.add_argument("--force", action="store_true", help="regenerate even if cached")
    list_ = msub.add_parser("list", help="list ladder models and whether they are cached")
    for p in (make, list_):
        p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
        p.add_argument("--dir", default=None, help="cache directory (default: user cache)")
    make.set_defaults(func=_models_make)
    list_.set_defaults(func=_models_list)

    profile = sub.add_parser(
        "profile",
        help="measure each configured model on this host; write a simulator fleet (TOML)",
    )
    profile.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    profile.add_argument("--out", default=None, metavar="FILE", help="write here (default: stdout)")
    profile.add_argument(
        "--rounds", type=int, default=3, help="repeats per measurement (default 3)"
    )
    profile.add_argument("--steps", type=int, default=16, help="decode steps timed (default 16)")
    profile.add_argument(
        "--no-coload", action="store_true", help="skip the slowdown beside other busy models"
    )
    profile.set_defaults(func=_profile)

    config = sub.add_parser("config", help="configuration files")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = csub.add_parser("check", help="validate a TOML config file")
    check.add_argument("file")
    check.set_defaults(func=_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zeta`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ZetaError as exc:
        print(f"zeta: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
