"""`POST /v1/completions`: OpenAI's legacy text-completion route, behind the same API keys.

The prompt is the model's input as it is (no chat template). A list of prompts is N generations admitted together
before the first response byte (a full queue refuses them all) and run together by the batched engine; each is one
choice, with its `index`. Streamed, the choices' chunks interleave as their tokens come.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from sse_starlette import ServerSentEvent

from inference import (
    Engine,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequest,
    StreamEvent,
    TextDelta,
)
from inference.types import TokenLogprob
from webapp.api.openai.builder import completion_request
from webapp.api.openai.completions_protocol import Completion, CompletionChoice, CompletionRequest, LegacyLogprobs
from webapp.api.openai.models import check_model
from webapp.api.openai.protocol import COMPLETION_RESPONSES, OpenAIUsage
from webapp.api.sse import closing, sse_json, sse_response
from webapp.errors import error_status, openai_error_body, rename_param
from webapp.middleware.auth import authenticate, client_of

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(authenticate)])


def legacy_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> LegacyLogprobs:
    """The legacy shape of `tokens`; `offset`: where the first token starts in the choice's text (the prompt's
    length with `echo`). `top_logprobs` holds the chosen token and its alternatives, as vLLM gives them."""
    offsets: list[int] = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return LegacyLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{t.token: t.logprob, **dict(t.top)} for t in tokens],
        text_offset=offsets,
    )


@dataclass
class _Choice:
    """What one prompt's generation has given so far."""

    prompt: str
    echo: bool
    text: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # characters of this choice's text sent so far (for text_offset)

    def __post_init__(self) -> None:
        self.offset = len(self.prompt) if self.echo else 0


@router.post("/completions", response_model=Completion, responses=COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    engine: Engine = request.app.state.engine
    generations = completion_request(body, request.app.state.settings, request_id=request.state.request_id)
    info = engine.ensure_ready()
    check_model(body.model, info)
    streams = await _admit_all(engine, [client_of(request, generation) for generation in generations])
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = [_Choice(g.prompt or "", body.echo) for g in generations]
    logprobs = body.logprobs is not None

    def shaped(choice_list: list[CompletionChoice], usage: OpenAIUsage | None = None) -> Completion:
        return Completion(id=completion_id, created=created, model=info.model_id, choices=choice_list, usage=usage)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_chunks(streams, choices, shaped, logprobs, include_usage))
    results: dict[int, GenerationResult] = {}
    async for index, event in _merged(streams):
        choice = choices[index]
        if isinstance(event, TextDelta):
            choice.text.append(event.text)
            choice.tokens += event.logprobs
        else:
            results[index] = event
    if len(results) != len(choices):
        raise InferenceError("a generation ended without a result")
    return shaped(
        [
            CompletionChoice(
                index=index,
                text=(choice.prompt if choice.echo else "") + "".join(choice.text),
                logprobs=legacy_logprobs(choice.tokens, choice.offset) if logprobs else None,
                finish_reason=results[index].finish_reason,
            )
            for index, choice in enumerate(choices)
        ],
        _usage(results.values()),
    )


async def _admit_all(engine: Engine, generations: list[GenerationRequest]) -> list[AsyncIterator[StreamEvent]]:
    """Every prompt admitted, or none: a refusal (a full queue, a prompt over the context) closes those admitted."""
    streams: list[AsyncIterator[StreamEvent]] = []
    try:
        for generation in generations:
            streams.append(await engine.submit(generation))
    except BaseException as error:
        # Not iterated yet, a stream's own cleanup has not started: dropping the last reference releases its place
        # (the engines' finalizers), at once rather than when the traceback that holds this frame goes.
        while streams:
            await streams.pop().aclose()  # type: ignore[attr-defined]
        if isinstance(error, InvalidRequest):
            rename_param(error, {"messages": "prompt"})  # a prompt over the context
        raise
    return streams


_DONE = object()


async def _merged(streams: list[AsyncIterator[StreamEvent]]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """(choice index, event) from every stream as the events come; leaving early closes every stream (which
    cancels its generation). One stream is read directly, without a task."""
    if len(streams) == 1:
        async for event in closing(streams[0]):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in closing(stream):
                await queue.put((index, event))
        except Exception as error:  # handed to the reader, which raises it
            await queue.put((index, error))
        finally:
            await queue.put((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(results: Iterable[GenerationResult]) -> OpenAIUsage:
    done = list(results)
    prompt, completion = sum(r.input_length for r in done), sum(r.output_length for r in done)
    return OpenAIUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _chunks(
    streams: list[AsyncIterator[StreamEvent]],
    choices: list[_Choice],
    shaped: Callable[..., Completion],
    logprobs: bool,
    include_usage: bool,
) -> AsyncIterator[ServerSentEvent]:
    def chunk(choice: CompletionChoice) -> ServerSentEvent:
        payload = shaped([choice])
        return ServerSentEvent(sse_json(payload.model_dump_json(exclude={"usage"} if not include_usage else set())))

    empty = LegacyLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]) if logprobs else None
    for index, choice in enumerate(choices):
        if choice.echo:
            yield chunk(CompletionChoice(index=index, text=choice.prompt, logprobs=empty))
    results: list[GenerationResult] = []
    try:
        async for index, event in _merged(streams):
            choice = choices[index]
            if isinstance(event, TextDelta):
                shaped_logprobs = legacy_logprobs(event.logprobs, choice.offset) if logprobs else None
                choice.offset += len(event.text)
                yield chunk(CompletionChoice(index=index, text=event.text, logprobs=shaped_logprobs))
            elif isinstance(event, GenerationResult):
                results.append(event)
                yield chunk(CompletionChoice(index=index, text="", logprobs=empty, finish_reason=event.finish_reason))
    except InferenceError as error:
        code, message, _ = error_status(error)
        yield ServerSentEvent(sse_json(json.dumps(openai_error_body(code, message))))
        return
    if include_usage:
        yield ServerSentEvent(sse_json(shaped([], _usage(results)).model_dump_json()))
    yield ServerSentEvent("[DONE]")
