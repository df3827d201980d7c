"""What wraps every request: the body-size limit (before anything is parsed) and the
Prometheus request counters."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from microlora.server.errors import ApiError, error_body
from microlora.server.service import Service


def install_middleware(app: FastAPI, service: Service) -> None:
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        service.metrics.requests.labels(route, str(response.status_code)).inc()
        service.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413: at once when Content-Length says
    so, else (chunked uploads) as soon as the bytes read pass the limit, never buffering more."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse(error_body(self._message(), "invalid_request_error",
                                               "body_too_large"), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(413, self._message(), code="body_too_large")
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body over the {self.limit / 2**20:g} MiB limit"
