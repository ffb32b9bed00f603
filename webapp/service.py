"""Translation between API bodies and the engine seam, shared by the documented and OpenAI routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from inference import GenerationRequest, GenerationResult, InferenceError, Message, StreamEvent
from webapp.errors import BadRequest, error_status
from webapp.observability import current_request_id
from webapp.schemas import ChatMessage, GenerateTextResponse, TextGenerationRequest

SSE_PING_SECONDS = 15


def conversation_of(body: TextGenerationRequest, system_message: str | None) -> list[ChatMessage]:
    """System message (if any) + history + the new user text: what the model is asked to continue."""
    messages: list[ChatMessage] = []
    if system_message:
        messages.append(ChatMessage(role="system", content=system_message))
    messages += body.conversation_history or []
    messages.append(ChatMessage(role="user", content=body.text))
    return messages


def check_max_new_tokens(value: int, cap: int, field: str = "max_new_tokens") -> None:
    if value > cap:
        raise BadRequest(f"{field}: must be at most {cap} (MAX_NEW_TOKENS_CAP)", param=field)


def generation_request(
    body: TextGenerationRequest, conversation: list[ChatMessage], max_new_tokens_cap: int, request_id: str = ""
) -> GenerationRequest:
    check_max_new_tokens(body.max_new_tokens, max_new_tokens_cap)
    return GenerationRequest(
        messages=tuple(Message(role=m.role, content=m.content) for m in conversation),
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        request_id=request_id or current_request_id(),
    )


def text_response(conversation: list[ChatMessage], result: GenerationResult, model: str) -> GenerateTextResponse:
    return GenerateTextResponse(
        generated_text=result.text,
        full_conversation=[*conversation, ChatMessage(role="assistant", content=result.text)],
        model=model,
        input_length=result.input_length,
        output_length=result.output_length,
    )


async def closing(stream: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Iterate an engine stream and always close it, so a departed client cancels its generation."""
    try:
        async for event in stream:
            yield event
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def sse_response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    return EventSourceResponse(
        events, ping=SSE_PING_SECONDS, sep="\n", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def error_event_data(error: InferenceError) -> str:
    code, message, _ = error_status(error)
    return json.dumps({"detail": message, "status": code})
