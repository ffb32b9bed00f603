"""Request limits: body size (an ASGI middleware), conversation size, and the OpenAPI schema that documents them.

Every limit is a setting (inference/settings.py) and every refusal is a 4xx with a message naming the
setting, sent before any tokenization or generation work is done.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webapp.errors import api_error_body


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit. An HTTPException, so FastAPI's body parsing
    re-raises it as it is (rather than turning it into a 400) and the app's handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=body_too_large_message(limit))


def body_too_large_message(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes (MAX_BODY_BYTES)"


class BodySizeLimitMiddleware:
    """Refuses request bodies above `max_bytes` with 413, on every route (API, docs and the Gradio page).

    A declared Content-Length above the limit is refused before a byte of the body is read. A chunked
    body (no Content-Length), or one that is longer than it declared, is counted as the app reads it and
    refused as soon as it passes the limit; nothing above the limit is ever buffered.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # Reached only where the app let the error through (e.g. a mounted app without a handler for it).
            if response_started:
                raise
            await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = body_too_large_message(self.max_bytes)
        path = scope.get("path", "")
        body = api_error_body(path, 413, message)  # Anthropic's, OpenAI's or {"detail"}, by the path
        payload = json.dumps(body).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode("ascii")),
                    (b"connection", b"close"),  # the unread rest of the body is not worth reading
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


# --- The OpenAPI schema, with the limits of this deployment written into it -----------------------
