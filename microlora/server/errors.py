"""Errors in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``, for every
way a request can fail: our own ``ApiError``, request validation, and user errors raised by
the stages (``MicroloraError``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from microlora.core.errors import MicroloraError


class ApiError(HTTPException):
    """An HTTP error with OpenAI's error body: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(status, message)
        self.kind, self.code = kind, code


def error_body(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        kind = getattr(e, "kind", "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind, getattr(e, "code", None)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
            elif err.get("type") == "extra_forbidden":
                problems.append(f"unknown field {where!r}")
            else:
                problems.append(f"{where or 'body'}: {err['msg']}")
        return JSONResponse(error_body("; ".join(problems), "invalid_request_error", None),
                            status_code=400)

    @app.exception_handler(MicroloraError)
    async def user_error(_request: Request, e: MicroloraError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_request_error", None), status_code=400)
