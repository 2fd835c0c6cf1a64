"""Request bodies before FastAPI sees them: a size limit whatever the framing, and strict JSON."""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import Request
from fastapi.routing import APIRoute

from qwenkit.server.errors import error_response

# A \uD800-\uDFFF escape: the only way JSON text can carry a surrogate (raw UTF-8 cannot).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BodySizeLimit:
    """Refuse bodies over the limit with 413, whether they declare a Content-Length or arrive chunked.

    The body is read here, counted as it comes, and handed on whole: a limit raised from inside the
    app's own reading would surface as FastAPI's generic 400 ("error parsing the body").
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: the client's disconnect, for is_disconnected()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.limit} bytes", "body_too_large")
        await response(scope, receive, send)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


class StrictJSONRequest(Request):
    """JSON as RFC 8259 has it: no bare NaN/Infinity (Python's json accepts them) and no lone
    surrogates (which would fail later, deep in tokenization, as a 500)."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            # A body of megabytes takes a while to parse: not on the event loop.
            self._json = await asyncio.to_thread(strict_json, body) if len(body) > INLINE_PARSE_BYTES else strict_json(body)
        return self._json


INLINE_PARSE_BYTES = 64 << 10


def strict_json(body: bytes):
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        raise json.JSONDecodeError(str(exc), "", 0) from None
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise json.JSONDecodeError("a string contains a lone surrogate (\\ud800-\\udfff): text must be valid Unicode", "", 0) from None
    return value


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
