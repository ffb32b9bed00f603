"""Errors a client can cause or meet, mapped to status codes in one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from inference import EngineBusy, EngineNotReady, GenerationFailed, InferenceError, InvalidRequest

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the schema accepted but the service's limits do not (e.g. above MAX_NEW_TOKENS_CAP)."""

    def __init__(self, detail: str, param: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
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
    if isinstance(error, InvalidRequest):
        return status.HTTP_400_BAD_REQUEST, str(error), {}
    if isinstance(error, EngineBusy):
        return status.HTTP_503_SERVICE_UNAVAILABLE, str(error), {"Retry-After": str(error.retry_after_s)}
    if isinstance(error, EngineNotReady):
        return status.HTTP_503_SERVICE_UNAVAILABLE, f"service unavailable: {error}", {"Retry-After": "5"}
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


def is_openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def openai_error_body(code: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": OPENAI_ERROR_TYPES.get(code, "invalid_request_error" if code < 500 else "server_error"),
            "param": param,
            "code": None,
        }
    }


def error_response(
    request: Request, code: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> JSONResponse:
    """The error body in the shape of the API the request came in by: `{"detail"}` or OpenAI's `{"error"}`."""
    message = safe_text(message)
    param = None if param is None else safe_text(param, MAX_FIELD_NAME_CHARS * 4)
    body = openai_error_body(code, message, param) if is_openai_path(request) else {"detail": message}
    return JSONResponse(body, code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        param = next((".".join(_field_path(e.get("loc", ()))) for e in errors), None)
        return error_response(request, 400, describe_validation_errors(errors), param=param or None)

    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(request, error.status_code, str(error.detail), dict(error.headers or {}))

    async def on_known_error(request: Request, error: Exception) -> JSONResponse:
        code, message, headers = error_status(error)
        return error_response(request, code, message, headers, param=getattr(error, "param", None))

    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal server error")

    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(BadRequest, on_known_error)
    app.add_exception_handler(InferenceError, on_known_error)
    app.add_exception_handler(Exception, on_unexpected_error)
