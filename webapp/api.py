"""The documented endpoints: POST /api/v1/generate-text and POST /api/v1/chat."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from webapp import service
from webapp.auth import authenticate
from webapp.schemas import ChatRequest, ErrorResponse, GenerateTextRequest, GenerateTextResponse

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    500: {"model": ErrorResponse, "description": "Generation failed"},
    503: {"model": ErrorResponse, "description": "Model loading or service busy; retry after Retry-After seconds"},
}

router = APIRouter(prefix="/api/v1", tags=["text generation"], dependencies=[Depends(authenticate)])


@router.post("/generate-text", response_model=GenerateTextResponse, responses=ERROR_RESPONSES)
async def generate_text(body: GenerateTextRequest, request: Request) -> GenerateTextResponse:
    """General-purpose generation with an optional system message and history."""
    state = request.app.state
    return await service.respond(state.engine, body, body.system_message, state.settings.max_new_tokens_cap)


@router.post("/chat", response_model=GenerateTextResponse, responses=ERROR_RESPONSES)
async def chat(body: ChatRequest, request: Request) -> GenerateTextResponse:
    """Chat with the automatic conversational system message (replaced by `system_message` if given)."""
    state = request.app.state
    system = body.system_message or state.settings.chat_system_message
    return await service.respond(state.engine, body, system, state.settings.max_new_tokens_cap)
