"""Request limits: body size (an ASGI middleware), conversation size, and the OpenAPI schema that documents them.

Every limit is a setting (inference/settings.py) and every refusal is a 4xx with a message naming the
setting, sent before any tokenization or generation work is done.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webapp.errors import BadRequest, openai_error_body
from webapp.settings import Settings

OPENAI_PREFIX = "/v1/"


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
        body = openai_error_body(413, message) if path.startswith(OPENAI_PREFIX) else {"detail": message}
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


def check_conversation_limits(
    settings: Settings, *, history_messages: int, total_chars: int, history_field: str, text_field: str
) -> None:
    """MAX_HISTORY_MESSAGES and MAX_TOTAL_CHARS, as 400s naming the field and the setting."""
    if history_messages > settings.max_history_messages:
        raise BadRequest(
            f"{history_field}: {history_messages} earlier messages, above the limit of "
            f"{settings.max_history_messages} (MAX_HISTORY_MESSAGES)",
            param=history_field,
        )
    if total_chars > settings.max_total_chars:
        raise BadRequest(
            f"{text_field}: the messages hold {total_chars} characters together, above the limit of "
            f"{settings.max_total_chars} (MAX_TOTAL_CHARS)",
            param=text_field,
        )


# --- The OpenAPI schema, with the limits of this deployment written into it -----------------------

_TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that documents the configured limits and the real error codes.

    - `max_new_tokens` / `max_tokens` / `max_completion_tokens` get `maximum: MAX_NEW_TOKENS_CAP`;
      `conversation_history` and `messages` get `maxItems` from MAX_HISTORY_MESSAGES; `text` gets
      `maxLength: MAX_TOTAL_CHARS`.
    - FastAPI's automatic 422 is removed: validation errors are answered with 400 here
      (webapp/errors.py), which every route declares.
    """

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_limits(generate(), settings)  # FastAPI caches the schema it returns; edited in place
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_limits(schema: dict[str, Any], settings: Settings) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    for model in components.values():
        properties = model.get("properties", {})
        for name in _TOKEN_FIELDS:
            if name in properties:
                _set_in_numeric_schema(properties[name], "maximum", settings.max_new_tokens_cap)
        if "conversation_history" in properties:
            _set_in_array_schema(properties["conversation_history"], settings.max_history_messages)
        if "messages" in properties:
            _set_in_array_schema(properties["messages"], settings.max_history_messages + 1)
        if "text" in properties and properties["text"].get("type") == "string":
            properties["text"]["maxLength"] = settings.max_total_chars


def _set_in_numeric_schema(field: dict[str, Any], key: str, value: int) -> None:
    """`field` is `{"type": "integer"}` or `{"anyOf": [{"type": "integer"}, {"type": "null"}]}`."""
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "integer":
            branch[key] = value


def _set_in_array_schema(field: dict[str, Any], max_items: int) -> None:
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "array":
            branch["maxItems"] = max_items
