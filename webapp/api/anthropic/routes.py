"""Anthropic-compatible routes: POST /v1/messages (JSON or Anthropic's SSE events) and /v1/messages/count_tokens,
behind the same API keys (`x-api-key` or `Authorization: Bearer`). `anthropic-version` and `anthropic-beta` headers
are accepted and ignored."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from inference import Engine, GenerationResult, InferenceError, TextDelta
from webapp.api.anthropic.builder import anthropic_request
from webapp.api.anthropic.protocol import (
    ERRORS,
    MESSAGE_RESPONSES,
    CountTokensRequest,
    CountTokensResponse,
    MessageResponse,
    MessagesRequest,
    StopReason,
    TextOut,
    ToolUseOut,
    Usage,
)
from webapp.api.openai.models import check_model, submit_to_model
from webapp.api.openai.protocol import OpenAIToolCall
from webapp.api.openai.tools import ToolCalls
from webapp.api.sse import closing, sse_json, sse_response
from webapp.errors import anthropic_error_body, error_status
from webapp.middleware.auth import authenticate, client_of

router = APIRouter(prefix="/v1", tags=["Anthropic-compatible"], dependencies=[Depends(authenticate)])


@router.post("/messages", response_model=MessageResponse, responses=MESSAGE_RESPONSES)
async def create_message(body: MessagesRequest, request: Request):
    generation, tools = anthropic_request(body, request.app.state.settings, request_id=request.state.request_id)
    info, stream = await submit_to_model(request.app.state.engine, client_of(request, generation), body.model)
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return sse_response(_events(closing(stream, through=tools.events), message_id, info.model_id, tools.active))
    async for event in closing(stream):
        if isinstance(event, GenerationResult):
            calls = tools.parse(event.text)
            content: list[TextOut | ToolUseOut] = list(tool_use_blocks(calls)) if calls else [TextOut(text=event.text)]
            return MessageResponse(
                id=message_id,
                model=info.model_id,
                content=content,
                stop_reason=stop_reason(event, calls),
                stop_sequence=None if calls else event.stop_sequence,
                usage=Usage(input_tokens=event.input_length, output_tokens=event.output_length),
            )
    raise InferenceError("the generation ended without a result")


@router.post("/messages/count_tokens", response_model=CountTokensResponse, responses=ERRORS)
async def count_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    """The prompt tokens the model would read for this request: the chat template applied, the tools' system text
    included (on ENGINE=remote, the upstream's count)."""
    engine: Engine = request.app.state.engine
    generation, _ = anthropic_request(body, request.app.state.settings, request_id=request.state.request_id)
    info = engine.ensure_ready()
    check_model(body.model, info)
    return CountTokensResponse(input_tokens=await engine.count_prompt_tokens(generation))


def _event(kind: str, **fields: Any) -> ServerSentEvent:
    return ServerSentEvent(sse_json(json.dumps({"type": kind, **fields}, ensure_ascii=False)), event=kind)


async def _events(
    stream: AsyncIterator[object], message_id: str, model: str, tools_offered: bool
) -> AsyncIterator[ServerSentEvent]:
    """Anthropic's stream: message_start, the content blocks (start, deltas, stop), message_delta, message_stop.

    Without tools the text block opens at once (then a ping, as Anthropic sends them); with tools offered a reply
    may turn out to be a call, so a block opens with the first text or call. An engine error ends the stream with
    an `error` event in Anthropic's envelope. input_tokens is known at the end: message_start says 0 and
    message_delta carries the count (the SDKs take it from there)."""
    message = MessageResponse(
        id=message_id, model=model, content=[], stop_reason=None, usage=Usage(input_tokens=0, output_tokens=0)
    )
    yield _event("message_start", message=message.model_dump())
    index, text_open = 0, False
    if not tools_offered:
        yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        text_open = True
    yield _event("ping")
    try:
        calls: tuple[OpenAIToolCall, ...] = ()
        async for event in stream:
            if isinstance(event, TextDelta) and event.text:
                if not text_open:
                    yield _event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                    text_open = True
                yield _event("content_block_delta", index=index, delta={"type": "text_delta", "text": event.text})
            elif isinstance(event, ToolCalls):
                calls = event.calls
                for block in tool_use_blocks(calls):
                    start = {**block.model_dump(), "input": {}}
                    yield _event("content_block_start", index=index, content_block=start)
                    partial = json.dumps(block.input, ensure_ascii=False)
                    yield _event(
                        "content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": partial}
                    )
                    yield _event("content_block_stop", index=index)
                    index += 1
            elif isinstance(event, GenerationResult):
                if not calls and not text_open:  # an empty reply: one empty text block, as without streaming
                    yield _event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                    text_open = True
                if text_open:
                    yield _event("content_block_stop", index=index)
                delta = {
                    "stop_reason": stop_reason(event, calls),
                    "stop_sequence": None if calls else event.stop_sequence,
                }
                usage = {"input_tokens": event.input_length, "output_tokens": event.output_length}
                yield _event("message_delta", delta=delta, usage=usage)
    except InferenceError as error:
        code, text, _ = error_status(error)
        yield _event("error", error=anthropic_error_body(code, text)["error"])
        return
    yield _event("message_stop")


def stop_reason(result: GenerationResult, calls: tuple[OpenAIToolCall, ...] | None) -> StopReason:
    if calls:
        return "tool_use"
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_sequence is not None else "end_turn"


def tool_use_blocks(calls: tuple[OpenAIToolCall, ...]) -> list[ToolUseOut]:
    """The calls as tool_use blocks, with Anthropic's `toolu_` ids."""
    return [
        ToolUseOut(id=f"toolu_{uuid.uuid4().hex[:24]}", name=c.function.name, input=json.loads(c.function.arguments))
        for c in calls
    ]
