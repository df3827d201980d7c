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
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes,
                       upload_limit=service.config.max_upload_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        service.metrics.requests.labels(route, str(response.status_code)).inc()
        service.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413 (``upload_limit`` for files
    uploaded to ``POST /v1/documents``): at once when Content-Length says so, else (chunked
    uploads) as soon as the bytes read pass the limit, never buffering more."""

    def __init__(self, app, limit: int, upload_limit: int | None = None):
        self.app, self.limit = app, limit
        self.upload_limit = limit if upload_limit is None else upload_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        uploads = (scope["method"] == "POST" and scope["path"] == "/v1/documents" and
                   headers.get(b"content-type", b"").startswith(b"multipart/form-data"))
        limit = self.upload_limit if uploads else self.limit
        message = (f"upload over the {limit / 2**20:g} MiB limit for files" if uploads else
                   f"request body over the {limit / 2**20:g} MiB limit")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = JSONResponse(error_body(message, "invalid_request_error",
                                               "body_too_large"), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > limit:
                raise ApiError(413, message, code="body_too_large")
            return message_in

        await self.app(scope, limited_receive, send)
