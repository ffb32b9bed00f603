"""Errors a client can cause or meet, mapped to status codes in one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from inference import EngineBusy, EngineNotReady, GenerationFailed, InferenceError, InvalidRequest

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the schema accepted but the service's limits do not (e.g. above MAX_NEW_TOKENS_CAP)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One readable line naming each offending field."""
    parts: list[str] = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        kind = error.get("type", "")
        if kind == "json_invalid":
            parts.append(f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
        elif kind == "missing" and not loc:
            parts.append("request body is required (JSON)")
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"{'.'.join(loc) or 'body'}: {message}")
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


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation_errors(list(error.errors()))}, status.HTTP_400_BAD_REQUEST)

    async def on_known_error(request: Request, error: Exception) -> JSONResponse:
        code, message, headers = error_status(error)
        return JSONResponse({"detail": message}, code, headers=headers)

    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status.HTTP_500_INTERNAL_SERVER_ERROR)

    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(BadRequest, on_known_error)
    app.add_exception_handler(InferenceError, on_known_error)
    app.add_exception_handler(Exception, on_unexpected_error)
