"""The documented endpoints: POST /api/v1/generate-text and POST /api/v1/chat (JSON, or SSE with "stream")."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from inference import Engine, GenerationResult, InferenceError, TextDelta
from webapp.api.fields import ErrorResponse
from webapp.api.spec.builder import spec_request
from webapp.api.spec.protocol import (
    ChatMessage,
    ChatRequest,
    GenerateTextRequest,
    GenerateTextResponse,
    TextGenerationRequest,
)
from webapp.api.sse import closing, error_event_data, sse_json, sse_response
from webapp.middleware.auth import authenticate, client_of

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    413: {"model": ErrorResponse, "description": "Request body larger than MAX_BODY_BYTES"},
    500: {"model": ErrorResponse, "description": "Generation failed"},
    502: {"model": ErrorResponse, "description": "ENGINE=remote: the upstream failed or its stream broke"},
    503: {"model": ErrorResponse, "description": "Model loading or service busy; retry after Retry-After seconds"},
}
OK_RESPONSE: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'The generated text; with `"stream": true` a `text/event-stream` of `delta` events '
        "and one final `complete` event carrying this object.",
        "content": {"text/event-stream": {}},
    }
}

router = APIRouter(prefix="/api/v1", tags=["text generation"], dependencies=[Depends(authenticate)])


@router.post("/generate-text", response_model=GenerateTextResponse, responses={**OK_RESPONSE, **ERROR_RESPONSES})
async def generate_text(body: GenerateTextRequest, request: Request):
    """General-purpose generation with an optional system message and history."""
    return await _respond(request, body, body.system_message)


@router.post("/chat", response_model=GenerateTextResponse, responses={**OK_RESPONSE, **ERROR_RESPONSES})
async def chat(body: ChatRequest, request: Request):
    """Chat with the automatic conversational system message (replaced by `system_message` if given)."""
    return await _respond(request, body, body.system_message or request.app.state.settings.chat_system_message)


async def _respond(request: Request, body: TextGenerationRequest, system_message: str | None):
    engine: Engine = request.app.state.engine
    settings = request.app.state.settings
    generation, conversation = spec_request(body, system_message, settings, request_id=request.state.request_id)
    generation = client_of(request, generation)
    info = engine.ensure_ready()
    stream = await engine.submit(generation)  # a bad or unadmitted request fails here, before any byte is sent
    if body.stream:
        return sse_response(_sse_events(closing(stream), conversation, info.model_id))
    async for event in closing(stream):
        if isinstance(event, GenerationResult):
            return text_response(conversation, event, info.model_id)
    raise InferenceError("the generation ended without a result")


async def _sse_events(
    stream: AsyncIterator[object], conversation: list[ChatMessage], model: str
) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                yield ServerSentEvent(sse_json(json.dumps({"delta": event.text}, ensure_ascii=False)), event="delta")
            elif isinstance(event, GenerationResult):
                final = text_response(conversation, event, model)
                yield ServerSentEvent(sse_json(final.model_dump_json()), event="complete")
    except InferenceError as error:
        yield ServerSentEvent(error_event_data(error), event="error")


def text_response(conversation: list[ChatMessage], result: GenerationResult, model: str) -> GenerateTextResponse:
    return GenerateTextResponse(
        generated_text=result.text,
        full_conversation=[*conversation, ChatMessage(role="assistant", content=result.text)],
        model=model,
        input_length=result.input_length,
        output_length=result.output_length,
    )
