"""OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models, behind the same API keys."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from inference import Engine, GenerationResult, InferenceError, TextDelta
from webapp.auth import authenticate
from webapp.errors import error_status, openai_error_body
from webapp.logprobs import chat_logprobs
from webapp.model_names import check_model, served_names
from webapp.observability import current_request_id
from webapp.request_builders import openai_request
from webapp.schemas import (
    OpenAIChatCompletion,
    OpenAIChatCompletionChunk,
    OpenAIChatCompletionRequest,
    OpenAIChoice,
    OpenAIChunkChoice,
    OpenAIDelta,
    OpenAIErrorResponse,
    OpenAIModel,
    OpenAIModelList,
    OpenAIResponseMessage,
    OpenAIUsage,
)
from webapp.sse import closing, sse_json, sse_response
from webapp.tool_calls import ToolCalls, ToolUse, finish_reason, tool_call_deltas

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(authenticate)])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": OpenAIErrorResponse, "description": text}
    for code, text in [
        (400, "Invalid request"),
        (401, "Missing or invalid API key"),
        (413, "Request body larger than MAX_BODY_BYTES"),
        (500, "Server error"),
        (502, "Upstream error"),
        (503, "Model loading or service busy; retry after Retry-After seconds"),
    ]
}
NOT_FOUND: dict[str, object] = {"model": OpenAIErrorResponse, "description": "Unknown model (`model_not_found`)"}
COMPLETION_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'The completion; with `"stream": true` a `text/event-stream` of `chat.completion.chunk` '
        "objects ending with `data: [DONE]`.",
        "content": {"text/event-stream": {}},
    },
    **ERRORS,
    404: NOT_FOUND,
}


@router.get("/models", response_model=OpenAIModelList, responses=ERRORS)
async def list_models(request: Request) -> OpenAIModelList:
    info = request.app.state.engine.ensure_ready()
    created = request.app.state.started_at
    return OpenAIModelList(data=[OpenAIModel(id=name, created=created) for name in served_names(info)])


@router.get("/models/{model_id:path}", response_model=OpenAIModel, responses={**ERRORS, 404: NOT_FOUND})
async def retrieve_model(model_id: str, request: Request) -> OpenAIModel:
    info = request.app.state.engine.ensure_ready()
    check_model(model_id, info, param=None)
    return OpenAIModel(id=model_id, created=request.app.state.started_at)


@router.post("/chat/completions", response_model=OpenAIChatCompletion, responses=COMPLETION_RESPONSES)
async def chat_completions(body: OpenAIChatCompletionRequest, request: Request):
    engine: Engine = request.app.state.engine
    generation = openai_request(body, request.app.state.settings, request_id=current_request_id())
    info = engine.ensure_ready()
    check_model(body.model, info)
    stream = await engine.submit(generation)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    tools = ToolUse(body)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(
            tools.events(closing(stream)), completion_id, created, info.model_id, include_usage, body.logprobs
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
