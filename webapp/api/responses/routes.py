"""POST /v1/responses: OpenAI's Responses API, stateless, on every engine (the request path of a chat completion).

The body becomes a chat completion request (webapp.api.responses.builder), so tools, `text.format` and the limits
behave exactly as on /v1/chat/completions. The reply is one `message` item (the text) or `function_call` items (the
calls); streamed, it is OpenAI's event sequence (docs/api.md, "The Responses API")."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from inference import GenerationResult, InferenceError, TextDelta
from webapp.api.openai.models import submit_to_model
from webapp.api.openai.protocol import OpenAIToolCall
from webapp.api.openai.tools import ToolCalls
from webapp.api.responses.builder import responses_request
from webapp.api.responses.protocol import (
    RESPONSE_RESPONSES,
    IncompleteDetails,
    OutputFunctionCall,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from webapp.api.sse import closing, sse_json, sse_response
from webapp.errors import error_status
from webapp.middleware.auth import authenticate, client_of

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(authenticate)])


@router.post("/responses", response_model=ResponseObject, responses=RESPONSE_RESPONSES)
async def create_response(body: ResponsesRequest, request: Request):
    generation, tools = responses_request(body, request.app.state.settings, request_id=request.state.request_id)
    response_format = "tools" if tools.response_format is not None else "text.format"  # a forced call's grammar
    params = {"messages": "input", "response_format": response_format}
    info, stream = await submit_to_model(request.app.state.engine, client_of(request, generation), body.model, params)
    shell = _shell(body, info.model_id)
    events = closing(stream, through=tools.events)
    if body.stream:
        return sse_response(_events(events, shell))
    calls: tuple[OpenAIToolCall, ...] = ()
    async for event in events:
        if isinstance(event, ToolCalls):
            calls = event.calls
        elif isinstance(event, GenerationResult):
            return _finished(shell, event, calls, f"msg_{uuid.uuid4().hex}")
    raise InferenceError("the generation ended without a result")


def _shell(body: ResponsesRequest, model: str) -> ResponseObject:
    """The response before any output: an id, and the request's settings echoed (with OpenAI's defaults)."""
    text = body.text
    return ResponseObject(
        id=f"resp_{uuid.uuid4().hex}",
        created_at=int(time.time()),
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=model,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        text={
            "format": (text.format if text and text.format else {"type": "text"}),
            "verbosity": (text.verbosity if text and text.verbosity else "medium"),
        },
        tool_choice=body.tool_choice or "auto",
        tools=list(body.tools or []),
        user=body.user,
        metadata=body.metadata or {},
    )


def _finished(
    shell: ResponseObject, result: GenerationResult, calls: Sequence[OpenAIToolCall], message_id: str
) -> ResponseObject:
    """The whole response once the generation is over: the calls, else the text as one message."""
    incomplete = not calls and result.finish_reason == "length"
    output: list[OutputMessage | OutputFunctionCall]
    if calls:
        output = [
            OutputFunctionCall(
                id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.function.name, arguments=call.function.arguments
            )
            for call in calls
        ]
    else:
        status = "incomplete" if incomplete else "completed"
        output = [OutputMessage(id=message_id, status=status, content=[OutputText(text=result.text)])]
    return shell.model_copy(
        update={
            "status": "incomplete" if incomplete else "completed",
            "completed_at": None if incomplete else int(time.time()),
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            "output": output,
            "usage": ResponseUsage(
                input_tokens=result.input_length,
                output_tokens=result.output_length,
                total_tokens=result.input_length + result.output_length,
            ),
        }
    )


def _dumped(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


async def _events(stream: AsyncIterator[object], shell: ResponseObject) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's event sequence for one response, `sequence_number` counting from 0."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> ServerSentEvent:
        data = {"type": kind, "sequence_number": next(numbers), **{k: _dumped(v) for k, v in fields.items()}}
        return ServerSentEvent(sse_json(json.dumps(data, ensure_ascii=False)), event=kind)

    message = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[])
    where = {"item_id": message.id, "output_index": 0, "content_index": 0}
    started = False  # whether the message item (and its text part) was announced
    calls: tuple[OpenAIToolCall, ...] = ()
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    try:
        async for item in stream:
            if isinstance(item, TextDelta):
                if not started:
                    started = True
                    yield event("response.output_item.added", output_index=0, item=message)
                    yield event("response.content_part.added", **where, part=OutputText(text=""))
                yield event("response.output_text.delta", **where, delta=item.text, logprobs=[])
            elif isinstance(item, ToolCalls):
                calls = item.calls
            elif isinstance(item, GenerationResult):
                final = _finished(shell, item, calls, message.id)
                if not calls and not started:  # an empty reply: its message is still announced
                    yield event("response.output_item.added", output_index=0, item=message)
                    yield event("response.content_part.added", **where, part=OutputText(text=""))
                for done in _item_events(final):
                    yield event(done.pop("type"), **done)
                yield event(f"response.{final.status}", response=final)
    except InferenceError as error:
        _, detail, _ = error_status(error)
        failed = shell.model_copy(
            update={"status": "failed", "error": ResponseError(code="server_error", message=detail)}
        )
        yield event("response.failed", response=failed)


def _item_events(final: ResponseObject) -> list[dict[str, Any]]:
    """The events that close the output items (a message's text is already streamed; a call comes whole)."""
    events: list[dict[str, Any]] = []
    for index, item in enumerate(final.output):
        if isinstance(item, OutputMessage):
            part = item.content[0]
            where = {"item_id": item.id, "output_index": index, "content_index": 0}
            events += [
                {"type": "response.output_text.done", **where, "text": part.text, "logprobs": []},
                {"type": "response.content_part.done", **where, "part": part},
            ]
        else:
            added = item.model_copy(update={"arguments": "", "status": "in_progress"})
            where = {"item_id": item.id, "output_index": index}
            events += [
                {"type": "response.output_item.added", "output_index": index, "item": added},
                {"type": "response.function_call_arguments.delta", **where, "delta": item.arguments},
                {
                    "type": "response.function_call_arguments.done",
                    **where,
                    "name": item.name,
                    "arguments": item.arguments,
                },
            ]
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events
