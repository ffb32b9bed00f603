"""Translation between API bodies and the engine seam, shared by the documented and OpenAI routes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from inference import GenerationRequest, GenerationResult, InferenceError, Message, StreamEvent
from webapp.errors import BadRequest, error_status
from webapp.limits import check_conversation_limits
from webapp.observability import current_request_id
from webapp.schemas import ChatMessage, GenerateTextResponse, TextGenerationRequest
from webapp.settings import Settings

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
    body: TextGenerationRequest, conversation: list[ChatMessage], settings: Settings, request_id: str = ""
) -> GenerationRequest:
    history = body.conversation_history or []
    check_conversation_limits(
        settings,
        history_messages=len(history),
        # What the client sent; the automatic system message of /chat is the operator's and not counted.
        total_chars=len(body.text) + len(body.system_message or "") + sum(len(m.content) for m in history),
        history_field="conversation_history",
        text_field="text",
    )
    cap = settings.max_new_tokens_cap
    # An explicit value above the cap is an error; the default is lowered to a cap below it.
    max_new_tokens = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else min(body.max_new_tokens, cap)
    check_max_new_tokens(max_new_tokens, cap)
    return GenerationRequest(
        messages=tuple(Message(role=m.role, content=m.content) for m in conversation),
        max_new_tokens=max_new_tokens,
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


# Characters that JSON leaves unescaped but line readers that follow Python's str.splitlines (httpx's
# iter_lines, among others) take for line breaks, which would cut an SSE `data:` line in two.
_LINE_BREAKS_JSON_KEEPS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse_json(payload: str) -> str:
    """A JSON text made safe for one SSE `data:` line (still the same JSON value)."""
    for char, escape in _LINE_BREAKS_JSON_KEEPS.items():
        payload = payload.replace(char, escape)
    return payload


def sse_response(events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    return EventSourceResponse(
        events, ping=SSE_PING_SECONDS, sep="\n", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def error_event_data(error: InferenceError) -> str:
    code, message, _ = error_status(error)
    return sse_json(json.dumps({"detail": message, "status": code}, ensure_ascii=False))
