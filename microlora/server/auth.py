"""Who is asking: the API key of ``Authorization: Bearer KEY``, as a route dependency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from microlora.server.errors import ApiError
from microlora.server.keys import KeyRecord
from microlora.server.service import Service


def service_of(request: Request) -> Service:
    return request.app.state.service


async def caller(request: Request) -> KeyRecord:
    """The API key's record; 401 without a valid one."""
    header = request.headers.get("authorization", "")
    if not header:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY' (the "
                            "server's operator makes keys)",
                       "authentication_error", "missing_api_key")
    scheme, _, token = header.partition(" ")
    key = service_of(request).keys.authenticate(token.strip()) \
        if scheme.lower() == "bearer" else None
    if key is None:
        raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
    return key


def arrival(request: Request) -> Callable[[], None]:
    """What withdraws this request's announcement to the batcher (``middleware.Announce``)
    once it is submitted; nothing to withdraw where none was made."""
    return getattr(request.state, "arrival", _nothing)


def _nothing() -> None:
    pass


Caller = Annotated[KeyRecord, Depends(caller)]
Served = Annotated[Service, Depends(service_of)]
Arrival = Annotated[Callable[[], None], Depends(arrival)]
