"""Who is asking: the API key of ``Authorization: Bearer KEY``, as a route dependency."""

from __future__ import annotations

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


Caller = Annotated[KeyRecord, Depends(caller)]
Served = Annotated[Service, Depends(service_of)]
