"""`zeta serve`: an OpenAI-compatible HTTP API over a Scheduler (Starlette on uvicorn).

``zeta serve --config zeta.toml`` runs it from the command line; in Python::

    from zeta.serve import create_app, start_server

    app = create_app(scheduler, api_key=None)      # an ASGI app, for any ASGI server
    with start_server(scheduler) as server:        # uvicorn on a thread of its own
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
"""

from __future__ import annotations

from ._app import DEFAULT_MAX_BODY_BYTES as DEFAULT_MAX_BODY_BYTES
from ._app import create_app as create_app
from ._run import SHUTDOWN_GRACE_S as SHUTDOWN_GRACE_S
from ._run import RunningServer as RunningServer
from ._run import serve as serve
from ._run import start_server as start_server

__all__ = (
    "DEFAULT_MAX_BODY_BYTES",
    "SHUTDOWN_GRACE_S",
    "RunningServer",
    "create_app",
    "serve",
    "start_server",
)
