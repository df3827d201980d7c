"""What wraps every request: the body-size limit (before anything is parsed), the
announcement of a completion request to the batcher, and the Prometheus request counters,
which also catch what escapes a route (a 500, counted)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from microlora.server.errors import INTERNAL, ApiError, error_body, log
from microlora.server.service import Metrics, Service

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")


def install_middleware(app: FastAPI, service: Service) -> None:
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes,
                       upload_limit=service.config.max_upload_bytes)
    app.add_middleware(Announce, service=service)
    app.add_middleware(Measure, metrics=service.metrics)  # added last: the outermost


class Announce:
    """Tells the batcher of a completion request as it arrives, before its body is read, so
    a batch being collected waits for it (``Batcher.expect``): a burst of clients is decoded
    as one batch though the event loop takes tens of ms to bring them all to ``submit``. The
    route withdraws the announcement once it has submitted (``arrival`` in the request's
    state); here it is withdrawn, if not yet, as the response starts (a 4xx before submit):
    before the client can see it, so no announcement outlives a response."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" \
                or scope["path"] not in COMPLETION_PATHS:
            return await self.app(scope, receive, send)
        withdraw = self.service.batcher.expect()
        scope.setdefault("state", {})["arrival"] = withdraw

        async def withdrawing_send(message) -> None:
            if message["type"] == "http.response.start":
                withdraw()
            await send(message)

        try:
            await self.app(scope, receive, withdrawing_send)
        finally:
            withdraw()  # no response started (the client went away, or an error escaped)


def arrival(request: Request) -> Callable[[], None]:
    """What withdraws this request's announcement to the batcher (``Announce``) once it is
    submitted; nothing to withdraw where none was made."""
    return getattr(request.state, "arrival", _nothing)


def _nothing() -> None:
    pass


Arrival = Annotated[Callable[[], None], Depends(arrival)]  # a completion route's dependency


class Measure:
    """Counts every response by route and status, and times it. An exception that escapes
    the routes and their handlers is logged and answered here with a 500 in OpenAI's shape:
    Starlette would answer it outside every middleware, as plain text, and uncounted."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status: int | None = None  # once the response has started

        async def noting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception as e:
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"),
                      type(e).__name__, e, exc_info=e)
            if status is not None:  # a stream broke off after its first bytes
                status = 500
                raise
            status = 500
            response = JSONResponse(error_body(INTERNAL, "server_error", "internal_error"),
                                    status_code=500)
            await response(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status or 500)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


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
