"""Operational endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from webapp.schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """The process is up (the model may still be loading)."""
    return HealthResponse(status="ok")
