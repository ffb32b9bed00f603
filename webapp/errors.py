"""Errors a client can cause or meet, mapped to status codes in one place."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from inference import EngineBusy, EngineNotReady, GenerationFailed, InferenceError, InvalidRequest, UpstreamError

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the schema accepted but the service's limits do not (e.g. above MAX_NEW_TOKENS_CAP)."""

    def __init__(self, detail: str, param: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.param = param


class ModelNotFound(Exception):
    """A `model` name this server does not serve (404, OpenAI's `code: "model_not_found"`)."""

    code = "model_not_found"

    def __init__(self, name: str, served: list[str], param: str | None = "model") -> None:
        self.detail = f"The model `{name}` does not exist: this server serves {', '.join(served)}"
        super().__init__(self.detail)
        self.param = param


MAX_ERROR_MESSAGE_CHARS = 2000
MAX_FIELD_NAME_CHARS = 64


def safe_text(text: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """Client-supplied text (a field name) made safe to echo: valid UTF-8 (lone surrogates become `?`), bounded."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _field_path(loc: Any) -> list[str]:
    return [safe_text(str(p), MAX_FIELD_NAME_CHARS) for p in loc if p != "body"]


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One readable line naming each offending field."""
    parts: list[str] = []
    for error in errors[:10]:
        loc = _field_path(error.get("loc", ()))
        kind = error.get("type", "")
        if kind == "json_invalid":
            parts.append(f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
        elif kind == "missing" and not loc:
            parts.append("request body is required (JSON)")
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    if len(errors) > 10:
        parts.append(f"and {len(errors) - 10} more")
    return "; ".join(parts) or "invalid request"


def error_status(error: Exception) -> tuple[int, str, dict[str, str]]:
    """(status code, message, headers) for an error raised by an engine or a route."""
    if isinstance(error, BadRequest):
        return status.HTTP_400_BAD_REQUEST, error.detail, {}
    if isinstance(error, ModelNotFound):
        return status.HTTP_404_NOT_FOUND, error.detail, {}
    if isinstance(error, InvalidRequest):
        return status.HTTP_400_BAD_REQUEST, str(error), {}
    if isinstance(error, EngineBusy):
        return status.HTTP_503_SERVICE_UNAVAILABLE, str(error), {"Retry-After": str(error.retry_after_s)}
    if isinstance(error, EngineNotReady):
        return status.HTTP_503_SERVICE_UNAVAILABLE, f"service unavailable: {error}", {"Retry-After": "5"}
    if isinstance(error, UpstreamError):
        return status.HTTP_502_BAD_GATEWAY, f"upstream error: {error}", {}
    if isinstance(error, GenerationFailed):
        return status.HTTP_500_INTERNAL_SERVER_ERROR, str(error), {}
    if isinstance(error, InferenceError):
        return status.HTTP_500_INTERNAL_SERVER_ERROR, str(error), {}
    return status.HTTP_500_INTERNAL_SERVER_ERROR, "internal server error", {}


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
}


# Anthropic's error types (docs.anthropic.com, "Errors"); the status codes stay this service's own (503 with
# Retry-After for busy or loading, 502 for an upstream failure).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "overloaded_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
}


def is_openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def is_anthropic_path(path: str) -> bool:
    """The Anthropic Messages API's paths (/v1/messages and below): their errors take Anthropic's envelope."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(code: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope: `{"type": "error", "error": {"type", "message"}}`."""
    kind = ANTHROPIC_ERROR_TYPES.get(code, "invalid_request_error" if code < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def api_error_body(
    path: str, code: int, message: str, param: str | None = None, error_code: str | None = None
) -> dict[str, Any]:
    """The error body in the shape of the API `path` belongs to: Anthropic's, OpenAI's (/v1) or `{"detail"}`."""
    if is_anthropic_path(path):
        return anthropic_error_body(code, message)
    if path.startswith("/v1/"):
        return openai_error_body(code, message, param, error_code)
    return {"detail": message}


def openai_error_body(
    code: int, message: str, param: str | None = None, error_code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; `error_code` is its machine-readable `code` (e.g. `model_not_found`), else null."""
    kind = OPENAI_ERROR_TYPES.get(code, "invalid_request_error" if code < 500 else "server_error")
    if error_code == ModelNotFound.code:
        kind = "invalid_request_error"  # what OpenAI answers for an unknown model
    return {"error": {"message": message, "type": kind, "param": param, "code": error_code}}


def error_response(
    request: Request,
    code: int,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    error_code: str | None = None,
) -> JSONResponse:
    """The error body in the shape of the API the request came in by: `{"detail"}`, OpenAI's `{"error"}` or
    Anthropic's `{"type": "error", "error"}`."""
    message = safe_text(message)
    param = None if param is None else safe_text(param, MAX_FIELD_NAME_CHARS * 4)
    body = api_error_body(request.url.path, code, message, param, error_code)
    return JSONResponse(body, code, headers=headers)


def _validation_param(errors: list[dict[str, Any]]) -> str | None:
    """The first offending field's dotted name; null for a body that is not JSON (its location is a character
    offset, not a field) or is missing."""
    for error in errors:
        if error.get("type") == "json_invalid":
            return None
        path = ".".join(_field_path(error.get("loc", ())))
        if path:
            return path
    return None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Methods no route serves but clients and fuzzers send: without a fallback they reached the page's mount (404).
_OTHER_METHODS = ("TRACE", "QUERY", "CONNECT")


def _allowed_methods(app: Any, scope: dict[str, Any]) -> list[str]:
    """The methods for which one of the app's own routes (not a mount, not these fallbacks) takes this path."""
    allowed: list[str] = []
    for route in app.router.routes:
        if isinstance(route, Mount) or getattr(route, "name", "") == _UNMATCHED:
            continue
        for method in _METHODS:
            if method not in allowed and route.matches({**scope, "method": method})[0] is Match.FULL:
                allowed.append(method)
    return [method for method in _METHODS if method in allowed]


_UNMATCHED = "unmatched_api_path"


def install_unmatched_routes(
    app: FastAPI,
    prefixes: tuple[str, ...] = ("/v1", "/api/v1"),
    exact_paths: tuple[str, ...] = ("/health", "/ready", "/metrics"),
) -> None:
    """404 and 405 (with `Allow`) for unknown paths and methods under the API prefixes, in each API's error shape.

    Without them a path no API route matches falls through to the page mounted at `/`, whose answer is Gradio's
    `{"detail": "Not Found"}` (and a wrong method a 404 too). Call it after the API routers, before the page's mount.
    """

    async def unmatched(request: Request) -> None:
        allowed = _allowed_methods(request.app, request.scope)
        where = f"{request.method} {request.url.path}"
        if allowed:
            raise HTTPException(
                status.HTTP_405_METHOD_NOT_ALLOWED,
                f"method not allowed: {where}; this route allows {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such route: {where} (the API is documented at /docs)")

    for prefix in prefixes:
        for path in (prefix, f"{prefix}/{{rest:path}}"):
            app.add_api_route(
                path, unmatched, methods=[*_METHODS, *_OTHER_METHODS], include_in_schema=False, name=_UNMATCHED
            )
    for path in exact_paths:  # the service's own routes outside the prefixes (/health, /ready, /metrics)
        app.add_api_route(path, unmatched, methods=list(_OTHER_METHODS), include_in_schema=False, name=_UNMATCHED)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        return error_response(request, 400, describe_validation_errors(errors), param=_validation_param(errors))

    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(request, error.status_code, str(error.detail), dict(error.headers or {}))

    async def on_known_error(request: Request, error: Exception) -> JSONResponse:
        code, message, headers = error_status(error)
        param, error_code = getattr(error, "param", None), getattr(error, "code", None)
        return error_response(request, code, message, headers, param=param, error_code=error_code)

    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal server error")

    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(BadRequest, on_known_error)
    app.add_exception_handler(ModelNotFound, on_known_error)
    app.add_exception_handler(InferenceError, on_known_error)
    app.add_exception_handler(Exception, on_unexpected_error)


def rename_param(error: InvalidRequest, renames: Mapping[str, str]) -> None:
    """An engine's 400 (`InvalidRequest`, raised at submit) names the field in the chat API's terms (`messages`,
    `response_format`); a route whose body calls it otherwise renames it (`prompt`, `input`, `text.format`)."""
    if error.param in renames:
        error.param = renames[error.param]
