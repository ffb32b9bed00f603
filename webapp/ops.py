"""Operational endpoints: liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse

from webapp.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])

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
