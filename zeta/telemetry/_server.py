"""The opt-in metrics HTTP endpoint (Prometheus or OpenMetrics text on ``/metrics``).

It serves from its own daemon threads (prometheus_client's WSGI app on a threading WSGI server),
so it works the same next to an asyncio or a trio event loop and never blocks it; each scrape
runs :class:`~zeta.telemetry.ZetaCollector` in a server thread.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from ._logging import get_logger
from ._metrics import DeviceReadingSource, MetricsSource, ZetaCollector
from ._samplers import ProcessSampler

__all__ = ["DEFAULT_METRICS_HOST", "DEFAULT_METRICS_PORT", "MetricsServer", "serve_metrics"]

log = get_logger(__name__)

#: Loopback unless told otherwise: metrics reveal model names and load.
DEFAULT_METRICS_HOST = "127.0.0.1"
#: A port no common exporter claims by default.
DEFAULT_METRICS_PORT = 9464
#: How often the server thread checks for shutdown: bounds how long :meth:`MetricsServer.close`
#: blocks.
_POLL_S = 0.05


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _start(host: str, port: int, registry: CollectorRegistry) -> tuple[Any, threading.Thread]:
    """Bind (IPv4 or IPv6, as ``host`` says) and serve ``registry`` from a daemon thread."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    server = make_server(
        str(sockaddr[0]), port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": _POLL_S}, name="zeta-metrics",
        daemon=True,
    )  # fmt: skip
    thread.start()
    return server, thread


class MetricsServer:
    """A running metrics endpoint; :meth:`close` (or leaving the ``with`` block) stops it.

    Attributes:
        host, port: where it listens (``port`` is the real one when 0 was asked for).
        url: ``http://host:port/metrics``.
        registry: the registry it serves (zeta's own, never prometheus_client's global one,
            unless one was passed in).
        collector: the :class:`~zeta.telemetry.ZetaCollector` registered in it.
    """

    def __init__(
        self, server: Any, thread: threading.Thread, registry: CollectorRegistry,
        collector: ZetaCollector,
    ) -> None:  # fmt: skip
        self._server = server
        self._thread = thread
        self.registry = registry
        self.collector = collector
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]
        self._closed = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket and unregister the collector. Idempotent.

        Blocks briefly (the server thread's poll interval, and any scrape in progress); from
        async code use :meth:`aclose`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self.registry.unregister(self.collector)
        log.info("metrics_server_stopped", host=self.host, port=self.port)

    async def aclose(self) -> None:
        """:meth:`close` in a worker thread, so the event loop keeps running meanwhile."""
        import anyio

        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.aclose()


def serve_metrics(
    source: MetricsSource,
    host: str = DEFAULT_METRICS_HOST,
    port: int = DEFAULT_METRICS_PORT,
    *,
    registry: CollectorRegistry | None = None,
    devices: DeviceReadingSource | None = None,
    process: ProcessSampler | bool | None = None,
) -> MetricsServer:
    """Serve ``source``'s metrics over HTTP until the returned handle is closed.

    Binds at once (an ``OSError`` if the port is taken) and serves from daemon threads.

    Args:
        source: the scheduler (``recorder`` and ``snapshot()``).
        host: address to bind; loopback by default. Use ``"0.0.0.0"`` only on a trusted network.
        port: TCP port; 0 picks a free one (see :attr:`MetricsServer.port`).
        registry: registry to add the collector to; ``None`` makes a fresh one.
        devices, process: passed to :class:`~zeta.telemetry.ZetaCollector`.
    """
    registry = CollectorRegistry(auto_describe=True) if registry is None else registry
    collector = ZetaCollector(source, devices=devices, process=process)
    registry.register(collector)
    try:
        server, thread = _start(host, port, registry)
    except BaseException:
        registry.unregister(collector)
        raise
    handle = MetricsServer(server, thread, registry, collector)
    log.info("metrics_server_started", url=handle.url)
    return handle
