"""Running the app: uvicorn beside one scheduler, in the foreground (``zeta serve``) or on a
thread of its own (tests, benchmarks, an application that embeds the server).

The scheduler starts first and stops last: uvicorn serves inside ``async with scheduler``, so
models are loaded before the first request is read, and a model that fails to load is the
caller's :class:`~zeta.ModelLoadError`, not a log line. The socket is bound before the models
load, so a port already taken fails at once. On shutdown uvicorn stops accepting, lets requests
in flight finish for up to :data:`SHUTDOWN_GRACE_S` seconds and cancels the rest (their slots
free at once), then the scheduler shuts down gracefully.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import anyio
import uvicorn

from .._config import Config, load_config
from .._exceptions import ConfigError
from .._scheduler import Scheduler
from ..telemetry._logging import get_logger
from ._app import create_app

__all__ = ["SHUTDOWN_GRACE_S", "RunningServer", "serve", "start_server"]

log = get_logger(__name__)

#: Seconds requests in flight may take to finish once shutdown starts; then they are cancelled.
SHUTDOWN_GRACE_S = 10


class _Server(uvicorn.Server):
    """uvicorn's server, less its signal handlers: the runner handles signals itself, so the
    scheduler shuts down after uvicorn instead of the process ending under it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (IPv4 or IPv6) and ``port`` (0: a free one).

    Raises:
        ConfigError: the address cannot be bound (taken, not local, unknown host).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(True)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def _uvicorn(app: Any, sock: socket.socket) -> _Server:
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        ws="none",
        log_config=None,  # logging is the application's to configure
        access_log=False,
        server_header=False,
        proxy_headers=False,  # nothing here reads the client's address
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return _Server(config)


async def _run(
    scheduler: Scheduler,
    server: _Server,
    sock: socket.socket,
    *,
    started: Callable[[], None],
    signals: bool,
) -> None:
    async def announce() -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn has no event for it
            await anyio.sleep(0.005)
        started()

    async with scheduler, anyio.create_task_group() as tg:
        if signals:
            tg.start_soon(_stop_on_signals, server)
        tg.start_soon(announce)
        try:
            await server.serve(sockets=[sock])
        finally:
            tg.cancel_scope.cancel()


async def _stop_on_signals(server: _Server) -> None:
    """The first SIGINT or SIGTERM shuts down gracefully; a second one stops waiting for
    requests in flight."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True


def serve(
    config: Config | str | os.PathLike[str],
    *,
    host: str | None = None,
    port: int | None = None,
    announce: Callable[[str], None] | None = None,
    profile: str | os.PathLike[str] | None = None,
) -> None:
    """Run ``zeta serve`` in the foreground until SIGINT or SIGTERM (what the command runs).

    Args:
        config: a config file or a loaded :class:`~zeta.Config`: the models, and its
            ``[serve]`` table (address, API key, body limit).
        host, port: override ``[serve]``'s.
        announce: called with the base URL (``http://127.0.0.1:8000``) once requests are served.
        profile: a ``zeta profile`` file whose measurements seed the scheduler's estimates.

    Raises:
        ConfigError: an invalid config, an API key variable with an invalid value, or an address
            that cannot be bound.
        ModelLoadError: a model that is not optional failed to load.
    """
    if not isinstance(config, Config):
        config = load_config(config)
    settings = config.serve
    api_key = settings.resolve_api_key()
    priors = None
    if profile is not None:
        from ..sim import load_fleet

        try:
            priors = load_fleet(profile).priors()
        except OSError as exc:
            raise ConfigError(f"cannot read the profile: {exc}", key="profile") from None
    scheduler = Scheduler.from_config(config, priors=priors)
    app = create_app(
        scheduler,
        api_key=api_key,
        max_body_bytes=settings.max_body_bytes,
        max_tokens=settings.max_tokens,
    )
    sock = _listen(host or settings.host, settings.port if port is None else port)
    url = _url(sock)
    server = _uvicorn(app, sock)

    def started() -> None:
        log.info("http_server_started", url=url, api_key=api_key is not None)
        if announce is not None:
            announce(url)

    with sock:
        anyio.run(
            lambda: _run(scheduler, server, sock, started=started, signals=True), backend="asyncio"
        )


class RunningServer:
    """``zeta serve`` on a thread of its own; :meth:`close` (or leaving the ``with`` block)
    stops it: uvicorn first, then the scheduler.

    Attributes:
        url: the base URL, ``http://127.0.0.1:PORT`` (the API is under ``url + "/v1"``).
        scheduler: the scheduler it serves; its ``snapshot()`` and ``recorder`` are safe to read
            from any thread.
    """

    def __init__(self, scheduler: Scheduler, app: Any, sock: socket.socket) -> None:
        self.scheduler = scheduler
        self.url = _url(sock)
        self._sock = sock
        self._server = _uvicorn(app, sock)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="zeta-serve", daemon=True)

    def _main(self) -> None:
        try:
            anyio.run(
                lambda: _run(
                    self.scheduler, self._server, self._sock, started=self._started.set,
                    signals=False,
                ),
                backend="asyncio",
            )  # fmt: skip
        except BaseException as exc:
            self._error = exc
        finally:
            self._sock.close()
            self._started.set()

    def _start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("zeta serve stopped while starting")

    def close(self) -> None:
        """Stop serving: requests in flight get :data:`SHUTDOWN_GRACE_S` seconds, then the
        scheduler shuts down. Idempotent."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_server(
    scheduler: Scheduler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    max_body_bytes: int | None = None,
    max_tokens: int | None = None,
) -> RunningServer:
    """Start serving ``scheduler`` (not yet running) on a thread of its own; returns once
    requests are served::

        with start_server(Scheduler(models=[...])) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

    Raises:
        ConfigError: an invalid argument, or an address that cannot be bound.
        ModelLoadError: a model that is not optional failed to load.
    """
    options: dict[str, Any] = {"api_key": api_key, "max_tokens": max_tokens}
    if max_body_bytes is not None:
        options["max_body_bytes"] = max_body_bytes
    app = create_app(scheduler, **options)
    server = RunningServer(scheduler, app, _listen(host, port))
    server._start()
    return server
