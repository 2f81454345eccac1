"""How the server answers errors: every one is a JSON body {"error", "detail"} with a 4xx (or 503) status.

The typed exceptions below are raised by the service and the generation engine; `install_error_handlers` maps
them, and FastAPI's own errors, to those bodies.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from client_sdk.errors import VeilError, WireFormatError
from client_sdk.schemas import ErrorResponse

KINDS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
         409: "conflict",
         413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter", 429: "rate_limited"}


class Overloaded(VeilError):
    """The server cannot take this request now (its queue is full); the client may retry after `retry_after` s."""

    def __init__(self, detail: str, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DeadlineExceeded(VeilError):
    """A generation ran past the server's per-request deadline and was stopped."""


def error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content=ErrorResponse(error=kind, detail=detail).model_dump())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        headers = {**(exc.headers or {}), **({"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {})}
        return error(exc.status_code, KINDS.get(exc.status_code, "http_error"), str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error(422, "invalid_parameter", detail)

    @app.exception_handler(WireFormatError)
    async def wire_error(_: Request, exc: WireFormatError) -> JSONResponse:
        return error(400, "bad_payload", str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return error(503, "overloaded", str(exc), {"Retry-After": str(max(1, round(exc.retry_after)))})

    @app.exception_handler(DeadlineExceeded)
    async def deadline(_: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error(503, "deadline_exceeded", str(exc))
