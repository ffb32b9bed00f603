"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from inference import EngineState
from webapp.api.fields import ErrorResponse
from webapp.middleware.auth import authenticate, bearer_scheme

router = APIRouter(tags=["operations"])


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    """`GET /ready`: 200 once the model is loaded and the engine admits work, else 503 with the reason."""

    status: EngineState
    reason: str
    model: str | None = None


READY_RETRY_AFTER_S = 5


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """The process is up (the model may still be loading)."""
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Loading, failed to load, or shutting down"}},
)
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine admits work; 503 with the reason before that and while draining."""
    engine = request.app.state.engine
    info = engine.info
    if engine.ready and info is not None:
        body = ReadyResponse(status="ready", reason="ready", model=info.model_id)
        return JSONResponse(body.model_dump())
    body = ReadyResponse(status=engine.state, reason=engine.state_reason, model=info.model_id if info else None)
    headers = {} if engine.state == "failed" else {"Retry-After": str(READY_RETRY_AFTER_S)}
    return JSONResponse(body.model_dump(), status.HTTP_503_SERVICE_UNAVAILABLE, headers=headers)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"},
        401: {"model": ErrorResponse, "description": "Missing or invalid API key (unless METRICS_PUBLIC=true)"},
    },
)
async def metrics(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> Response:
    """Prometheus metrics. Needs an API key unless METRICS_PUBLIC=true."""
    if not request.app.state.settings.metrics_public:
        await authenticate(request, credentials)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
