"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, as JSON and as SSE events.

Status codes (the OpenAPI schema documents exactly these):
- 400 a request the server cannot run as sent: malformed or non-strict JSON, a field out of range,
  a prompt too long for the context, a chat template that refuses the messages. Every check on a
  request's own input runs before generation starts, so a client error is always a 400.
- 401 missing or wrong API key (checked before the body is validated); 404 unknown model;
  405 wrong method (with `Allow`); 413 body too large; 429 rate limit (with `Retry-After`).
- 503 generation failed after the request was accepted (the engine's shared step failed): not the
  request's fault, worth retrying. A stream that has started ends with an error event instead
  (then `data: [DONE]`), since its status line has already been sent.
- 500 only for a bug in the server itself.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenkit.errors import QwenkitError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
GENERATION_FAILED = 503


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(status: int, message: str, code=None, param=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def generation_failed(error: str) -> APIError:
    return APIError(GENERATION_FAILED, error, "generation_failed")


# ---- server-sent events: the one place their framing is written --------------------------------

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: dict) -> str:
    # ASCII-escaped JSON: U+2028 and friends inside a data line would split it for clients
    # that break lines the way str.splitlines() does.
    return "data: " + json.dumps(payload) + "\n\n"


def sse_error(error: str) -> str:
    """The event that ends a stream whose generation failed (OpenAI's shape; `data: [DONE]` follows)."""
    return sse_event(error_body(GENERATION_FAILED, error, "generation_failed"))


def install_error_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(QwenkitError)
    async def _qwenkit(_: Request, exc: QwenkitError):
        return error_response(400, str(exc), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error")
            message, param = "the request body is not valid JSON" + (f": {reason}" if reason else ""), None
        return error_response(400, f"{message}" + (f" ({param})" if param else ""), "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")


# ---- the OpenAPI schema says what the server really sends ------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model", 405: "Method not allowed",
                 413: "Body too large", 429: "Rate limit reached", 503: "Generation failed (retry)"}


def documented_errors(*statuses: int) -> dict:
    """The `responses=` of a route: the error statuses it really sends, in OpenAI's shape, for the OpenAPI schema."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}
