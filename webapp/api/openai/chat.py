"""OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models, behind the same API keys."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from inference import GenerationResult, InferenceError, TextDelta
from webapp.api.openai.builder import openai_request
from webapp.api.openai.logprob_shapes import chat_logprobs
from webapp.api.openai.models import submit_to_model
from webapp.api.openai.protocol import (
    COMPLETION_RESPONSES,
    OpenAIChatCompletion,
    OpenAIChatCompletionChunk,
    OpenAIChatCompletionRequest,
    OpenAIChoice,
    OpenAIChunkChoice,
    OpenAIDelta,
    OpenAIResponseMessage,
    OpenAIUsage,
)
from webapp.api.openai.tools import ToolCalls, finish_reason, tool_call_deltas
from webapp.api.sse import closing, sse_json, sse_response
from webapp.errors import error_status, openai_error_body
from webapp.middleware.auth import authenticate, client_of

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(authenticate)])


@router.post("/chat/completions", response_model=OpenAIChatCompletion, responses=COMPLETION_RESPONSES)
async def chat_completions(body: OpenAIChatCompletionRequest, request: Request):
    generation, tools = openai_request(body, request.app.state.settings, request_id=request.state.request_id)
    # A forced call's grammar is built from the tools' parameters: a schema the engine cannot enforce is theirs.
    params = {"response_format": "tools"} if tools.response_format is not None else {}
    info, stream = await submit_to_model(request.app.state.engine, client_of(request, generation), body.model, params)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(
            closing(stream, through=tools.events), completion_id, created, info.model_id, include_usage, body.logprobs
        )
        return sse_response(chunks)
    tokens = []
    async for event in closing(stream):
        if isinstance(event, TextDelta):
            tokens += event.logprobs
        elif isinstance(event, GenerationResult):
            calls = tools.parse(event.text)
            message = OpenAIResponseMessage(content=None, tool_calls=list(calls)) if calls else None
            return OpenAIChatCompletion(
                id=completion_id,
                created=created,
                model=info.model_id,
                choices=[
                    OpenAIChoice(
                        message=message or OpenAIResponseMessage(content=event.text),
                        finish_reason=finish_reason(event, calls),  # type: ignore[arg-type]
                        logprobs=chat_logprobs(tokens) if body.logprobs else None,
                    )
                ],
                usage=_usage(event),
            )
    raise InferenceError("the generation ended without a result")


def _usage(result: GenerationResult) -> OpenAIUsage:
    return OpenAIUsage(
        prompt_tokens=result.input_length,
        completion_tokens=result.output_length,
        total_tokens=result.input_length + result.output_length,
    )


async def _chunks(
    stream: AsyncIterator[object],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    logprobs: bool = False,
) -> AsyncIterator[ServerSentEvent]:
    def chunk(delta: OpenAIDelta, finish: str | None = None, scored: TextDelta | None = None) -> ServerSentEvent:
        choice = OpenAIChunkChoice(delta=delta, finish_reason=finish)  # type: ignore[arg-type]
        if scored is not None:  # logprobs asked: the tokens of this chunk's text
            choice.logprobs = chat_logprobs(scored.logprobs)
        payload = OpenAIChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice])
        return ServerSentEvent(sse_json(payload.model_dump_json(exclude={"usage"} if not include_usage else set())))

    yield chunk(OpenAIDelta(role="assistant", content=""))
    calls: tuple = ()
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                yield chunk(OpenAIDelta(content=event.text), scored=event if logprobs else None)
            elif isinstance(event, ToolCalls):
                calls = event.calls
                for delta in tool_call_deltas(calls):
                    yield chunk(delta)
            elif isinstance(event, GenerationResult):
                yield chunk(OpenAIDelta(), finish_reason(event, calls))
                if include_usage:
                    usage_chunk = OpenAIChatCompletionChunk(
                        id=completion_id, created=created, model=model, choices=[], usage=_usage(event)
                    )
                    yield ServerSentEvent(sse_json(usage_chunk.model_dump_json()))
    except InferenceError as error:
        code, message, _ = error_status(error)
        yield ServerSentEvent(sse_json(json.dumps(openai_error_body(code, message))))
        return
    yield ServerSentEvent("[DONE]")
