"""The HTTP server: :func:`create_app` (FastAPI), :func:`serve` (blocking) and
:class:`ServerThread` (in the background), with dynamic batching and a web page."""

from deit.deploy.serve.app import (
    LOOPBACK,
    ServerThread,
    ServeSettings,
    create_app,
    require_server,
    serve,
)

__all__ = ["LOOPBACK", "ServeSettings", "ServerThread", "create_app", "require_server", "serve"]
