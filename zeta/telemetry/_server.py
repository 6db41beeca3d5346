"""The opt-in metrics HTTP endpoint (Prometheus or OpenMetrics text on ``/metrics``).

It is prometheus_client's own :func:`~prometheus_client.start_http_server` (a threading WSGI
server that logs no requests, IPv4 or IPv6 as the address says), serving a registry of zeta's
rather than the global one. It serves from daemon threads, so it works the same next to an
asyncio or a trio event loop and never blocks it; each scrape runs
:class:`~zeta.telemetry.ZetaCollector` in a server thread.
"""

from __future__ import annotations

import threading
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from ._logging import get_logger
from ._metrics import DeviceReadingSource, MetricsSource, ZetaCollector
from ._samplers import ProcessSampler

__all__ = ["DEFAULT_METRICS_HOST", "DEFAULT_METRICS_PORT", "MetricsServer", "serve_metrics"]

log = get_logger(__name__)

#: Loopback unless told otherwise: metrics reveal model names and load.
DEFAULT_METRICS_HOST = "127.0.0.1"
#: A port no common exporter claims by default.
DEFAULT_METRICS_PORT = 9464


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
        self, server: WSGIServer, thread: threading.Thread, registry: CollectorRegistry,
        collector: ZetaCollector,
    ) -> None:  # fmt: skip
        self._server = server
        self._thread = thread
        self.registry = registry
        self.collector = collector
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])
        self._closed = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket and unregister the collector. Idempotent.

        Blocks for up to the serving thread's poll interval (half a second in prometheus_client;
        a scrape already under way finishes on its own daemon thread); from async code use
        :meth:`aclose`.
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
        host: address to bind, IPv4 or IPv6 (``"::1"``); loopback by default. Use ``"0.0.0.0"``
            or ``"::"`` only on a trusted network.
        port: TCP port; 0 picks a free one (see :attr:`MetricsServer.port`).
        registry: registry to add the collector to; ``None`` makes a fresh one.
        devices, process: passed to :class:`~zeta.telemetry.ZetaCollector`.
    """
    registry = CollectorRegistry(auto_describe=True) if registry is None else registry
    collector = ZetaCollector(source, devices=devices, process=process)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, host, registry)
        thread.name = "zeta-metrics"  # for thread dumps; the library leaves it "Thread-N"
    except BaseException:
        registry.unregister(collector)
        raise
    handle = MetricsServer(server, thread, registry, collector)
    log.info("metrics_server_started", url=handle.url)
    return handle
