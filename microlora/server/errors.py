"""Errors in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``, for every
way a request can fail: our own ``ApiError``, request validation, and the stages' errors
(``MicroloraError``), reworded by ``api_error`` so that an error names only what its caller
may see. (What escapes all of these is answered in ``middleware.Measure``.)"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from microlora.core.errors import (
    MicroloraError,
    QuotaExceededError,
    TooFewAtomsError,
    UnknownNamespaceError,
)

log = logging.getLogger("microlora.server")
INTERNAL = "the server failed on this request (its log has the details)"


class ApiError(HTTPException):
    """An HTTP error with OpenAI's error body: {"error": {"message", "type", "code", "param"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(status, message)
        self.kind, self.code, self.param = kind, code, param


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def not_found(kind: str, ident: str) -> ApiError:
    """The one answer for a thing that does not exist and for one the caller may not read:
    404 with the same body apart from the id. Atom ids hash public inputs, so anyone can
    compute a guessed sentence's id; a different answer for "another tenant has it" would
    tell them that someone does."""
    return ApiError(404, f"no {kind} {ident!r}", code=f"{kind}_not_found")


def api_error(e: Exception) -> ApiError:
    """A stage's exception in API terms. The stages word their errors for the command line
    and its operator (the store's path, every namespace it has, flags such as -k), so only
    the errors a caller can act on are reworded here, naming what the caller may see; the
    rest are the server's problem: a 500 that says nothing (``internal_error``)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, TooFewAtomsError):
        if e.total == 0:
            return ApiError(400, "the namespaces searched hold no atoms yet: upload documents "
                                 "(POST /v1/documents) first", code="no_atoms")
        return ApiError(400, f"k={e.k} but the namespaces searched hold only {e.total} atoms; "
                             f"ask with k <= {e.total}", code="k_too_large", param="k")
    if isinstance(e, UnknownNamespaceError):  # listed, then dropped before it was read
        return ApiError(409, "a namespace this request uses was deleted while the request "
                             "ran; send it again", code="namespace_deleted")
    if isinstance(e, QuotaExceededError):  # only ever about the caller's own namespace
        return ApiError(429, str(e), "quota_exceeded", "quota_exceeded")
    return internal_error(e)


def internal_error(e: BaseException) -> ApiError:
    """A failure the caller cannot fix: logged here in full, answered with a 500 that says
    nothing about it (its text may name files or other users)."""
    log.error("request failed: %s: %s", type(e).__name__, e, exc_info=e)
    return ApiError(500, INTERNAL, "server_error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        kind = getattr(e, "kind", "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind, getattr(e, "code", None),
                                       getattr(e, "param", None)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        problems, fields = [], []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            fields.append(where)
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
            elif err.get("type") == "extra_forbidden":
                problems.append(f"unknown field {where!r}")
            elif err.get("type") == "value_error":  # our own message, without "Value error, "
                problems.append(f"{where or 'body'}: {err.get('ctx', {}).get('error', err['msg'])}")
            else:
                problems.append(f"{where or 'body'}: {err['msg']}")
        param = fields[0] or None if len(fields) == 1 else None
        return JSONResponse(error_body("; ".join(problems), "invalid_request_error", None,
                                       param), status_code=400)

    @app.exception_handler(MicroloraError)
    async def stage_error(request: Request, e: MicroloraError) -> JSONResponse:
        return await http_error(request, api_error(e))
