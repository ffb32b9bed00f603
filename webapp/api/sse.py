"""Server-sent events for the streamed replies of both API families, and the engine-stream helper the routes share."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from inference import InferenceError, StreamEvent
from webapp.errors import error_status

SSE_PING_SECONDS = 15


async def closing(
    stream: AsyncIterator[StreamEvent],
    through: Callable[[AsyncIterator[StreamEvent]], AsyncIterator[Any]] | None = None,
) -> AsyncIterator[Any]:
    """Iterate an engine stream (seen `through` a transform, e.g. the tool-call recogniser) and always close the
    engine's stream at the end, so a departed client cancels its generation. The one place that closes it."""
    events = stream if through is None else through(stream)
    try:
        async for event in events:
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
