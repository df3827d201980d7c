"""``microlora serve``: an OpenAI-compatible HTTP API over one store, with personal namespaces.

Every request carries an API key (``Authorization: Bearer KEY``) that names one user: the user
reads and writes only ``user:NAME`` and reads the shared corpora the key was granted. Answers
go through a ``Batcher``, so requests in flight together are decoded in one batch, each with
its own composed atoms. Documents are compiled into the caller's namespace by a background
job on a private copy of the base model. A web page for people is served at ``/``.

The pieces: ``service`` (the state), ``auth`` (keys), ``routes/`` (one module per resource),
``streaming`` and ``openai`` (answers and their shapes), ``errors`` and ``middleware``, and
``web/`` (the page's HTML, script and stylesheet, package data).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from microlora.server.config import ServeConfig
from microlora.server.errors import install_error_handlers
from microlora.server.middleware import install_middleware
from microlora.server.routes import completions, documents, namespaces, system, web
from microlora.server.service import Service, open_service


def create_app(service: Service) -> FastAPI:
    """The FastAPI application over a ``Service``."""
    app = create_api()
    app.state.service = service
    install_middleware(app, service)
    return app


def create_api() -> FastAPI:
    """The routes and their error handlers, with no service behind them: enough to make the
    OpenAPI schema (the tests fuzz the server against it). No /docs or /redoc: FastAPI's
    pages load their scripts from a CDN (blank offline, and a third party in every browser
    that opens them); the schema is at /openapi.json."""
    app = FastAPI(title="microlora", version="0.1.0",
                  description="OpenAI-compatible answers from composed micro-adapters",
                  docs_url=None, redoc_url=None)
    install_error_handlers(app)
    for routes in (system, completions, documents, namespaces, web):
        app.include_router(routes.router)
    return app


@contextmanager
def serve_in_thread(service: Service, host: str = "127.0.0.1", port: int = 0
                    ) -> Iterator[str]:
    """Run the server on a background thread (port 0: any free port) and yield its base URL;
    used by tests and benchmarks, which need a real server and a real HTTP client."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning",
                                           lifespan="off"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


__all__ = ["ServeConfig", "Service", "create_api", "create_app", "open_service",
           "serve_in_thread"]
