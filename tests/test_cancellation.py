"""Cancellation in the batched engine (ENGINE=batched, the default): a client that leaves frees its row.

In process (a stream closed or dropped after a few deltas, one dropped before it was read) and over HTTP through
a real uvicorn server (the spec's SSE and the OpenAI stream); the chat page's Stop is tested on both engines in
tests/test_ui.py (its handler closed early) and tests/test_ui_browser.py (the button). Every request asks for
LONG_TOKENS tokens of LONG_PROMPT, which really runs that long (measured greedy on the embedded model: 450 of 450
tokens in both engines, with or without a system message; `test_a_leaver_beside_other_rows_stops_counting` keeps
that honest). The assertions are on the engine's token counter and `running`, never on time: after the client
leaves, the row is gone and at most a few more tokens are generated, where an engine that kept generating for
nobody would count hundreds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from inference import BatchedEngine, GenerationRequest, GenerationResult, Message, TextDelta
from tests.conftest import AUTH, LiveServer, sse_events_from_lines

LONG_PROMPT = "Hitung dari 1 sampai 400, satu angka per baris."
LONG_TOKENS = 400
# In process, the stream's close marks the row cancelled at once: only a step already running can still add a
# token to the count (the decode thread checks the mark before counting).
IN_PROCESS_EXTRA = 2
# Over HTTP the server learns of the disconnect from its socket a moment later: a few more steps may run meanwhile.
OVER_HTTP_EXTRA = 24
# All a request left after 3 deltas may cost: those, the steps the engine ran ahead of the reader, and the above.
LEAVER_TOKENS_MAX = 48
NEIGHBOUR_TOKENS = 64  # what LONG_PROMPT is shown to run uncancelled: more than any bound above
HANG_GUARD_S = 300  # only against a hang: an engine that ignores the cancel finishes its 400 tokens well before


def long_request(max_new_tokens: int = LONG_TOKENS) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", LONG_PROMPT),), max_new_tokens=max_new_tokens, temperature=0.0)


@pytest.fixture(scope="module")
def batched(engine: BatchedEngine) -> BatchedEngine:
    """The engine users get (the shared fixture): default settings (bf16, FAST_DECODE, MAX_BATCH=auto)."""
    assert isinstance(engine, BatchedEngine)
    return engine


@pytest.fixture(scope="module")
def server(live_server: LiveServer) -> LiveServer:
    """The shared real server, on the engine users get (its own engine instance, batched)."""
    assert isinstance(live_server.engine, BatchedEngine)
    return live_server


def wait_idle(engine: BatchedEngine) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while engine.running or engine.queue_depth:
        assert time.monotonic() < deadline, f"{engine.running} generation(s) still running"
        time.sleep(0.01)


async def until_idle(engine: BatchedEngine) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while engine.running or engine.queue_depth:
        assert time.monotonic() < deadline, f"{engine.running} generation(s) still running"
        await asyncio.sleep(0.01)


async def read_deltas(stream: AsyncIterator[Any], count: int) -> list[str]:
    deltas: list[str] = []
    async for event in stream:
        assert isinstance(event, TextDelta), event  # the generation must not have ended by itself
        deltas.append(event.text)
        if len(deltas) == count:
            return deltas
    raise AssertionError("the stream ended early")


async def test_a_closed_stream_frees_its_row_at_once(batched: BatchedEngine) -> None:
    before = batched.generated_tokens_total
    stream = await batched.submit(long_request())
    await read_deltas(stream, 3)
    assert batched.running == 1
    await stream.aclose()  # type: ignore[attr-defined]
    at_close = batched.generated_tokens_total
    await until_idle(batched)
    assert batched.generated_tokens_total - at_close <= IN_PROCESS_EXTRA
    assert batched.generated_tokens_total - before < LEAVER_TOKENS_MAX


async def test_a_dropped_stream_frees_its_row(batched: BatchedEngine) -> None:
    """A consumer that just lets go of its stream (no aclose): garbage collection cancels the row."""
    before = batched.generated_tokens_total
    stream = await batched.submit(long_request())
    await read_deltas(stream, 3)
    del stream
    gc.collect()
    at_drop = batched.generated_tokens_total
    await until_idle(batched)
    assert batched.generated_tokens_total - at_drop <= IN_PROCESS_EXTRA
    assert batched.generated_tokens_total - before < LEAVER_TOKENS_MAX


async def test_a_stream_dropped_unread_frees_its_row(batched: BatchedEngine) -> None:
    before = batched.generated_tokens_total
    stream = await batched.submit(long_request())
    while batched.generated_tokens_total == before:  # the decode thread admitted it and it is generating
        await asyncio.sleep(0.001)
    del stream
    gc.collect()
    at_drop = batched.generated_tokens_total
    await until_idle(batched)
    assert batched.generated_tokens_total - at_drop <= IN_PROCESS_EXTRA
    assert batched.generated_tokens_total - before < LEAVER_TOKENS_MAX


async def test_a_leaver_beside_other_rows_stops_counting(batched: BatchedEngine) -> None:
    """The row that left goes while its neighbours keep generating (they are no cover for a row kept alive).

    The neighbours run LONG_PROMPT uncancelled to their limit, more tokens than any bound in this module allows: had
    the prompt ended by itself within a bound, a cancel that did not work would go unseen.
    """
    before = batched.generated_tokens_total
    leaver = await batched.submit(long_request())
    neighbours = [await batched.submit(long_request(max_new_tokens=NEIGHBOUR_TOKENS)) for _ in range(2)]
    tasks = [asyncio.ensure_future(collect_result(stream)) for stream in neighbours]
    await read_deltas(leaver, 3)
    await leaver.aclose()  # type: ignore[attr-defined]
    results = await asyncio.gather(*tasks)
    await until_idle(batched)
    assert [(result.output_length, result.finish_reason) for result in results] == [(NEIGHBOUR_TOKENS, "length")] * 2
    leaver_tokens = batched.generated_tokens_total - before - sum(result.output_length for result in results)
    # The leaver's tokens: those generated while it read its 3 deltas, and not the hundreds it asked for.
    assert 3 <= leaver_tokens < LEAVER_TOKENS_MAX, leaver_tokens


async def collect_result(stream: AsyncIterator[Any]) -> GenerationResult:
    async for event in stream:
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("the stream ended without a result")


# ---- over HTTP, through a real uvicorn server ----


def leave_after(server: LiveServer, path: str, body: dict[str, Any], is_delta: Any, count: int = 3) -> int:
    """POST a streaming `body`, read `count` deltas, hang up; the engine's token count when the client left."""
    with httpx.stream("POST", f"{server.base_url}{path}", headers=AUTH, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        deltas = 0
        for event, data in sse_events_from_lines(response.iter_lines()):
            assert data != "[DONE]" and event != "complete", "the stream ended by itself"
            deltas += bool(is_delta(event, data))
            if deltas == count:
                break
        else:
            raise AssertionError("the stream ended early")
    return server.engine.generated_tokens_total  # leaving the block closed the connection


def test_spec_sse_disconnect_frees_the_row(server: LiveServer) -> None:
    engine = server.engine
    before = engine.generated_tokens_total
    body = {"text": LONG_PROMPT, "max_new_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    at_close = leave_after(server, "/api/v1/generate-text", body, lambda event, _data: event == "delta")
    wait_idle(engine)
    assert engine.generated_tokens_total - at_close <= OVER_HTTP_EXTRA
    assert engine.generated_tokens_total - before < LEAVER_TOKENS_MAX


def test_openai_stream_disconnect_frees_the_row(server: LiveServer) -> None:
    engine = server.engine
    before = engine.generated_tokens_total
    body = {
        "model": "sahabat-ai",
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": LONG_TOKENS,
        "temperature": 0,
        "stream": True,
    }

    def is_delta(_event: str, data: str) -> bool:
        return bool(json.loads(data)["choices"][0]["delta"].get("content"))

    at_close = leave_after(server, "/v1/chat/completions", body, is_delta)
    wait_idle(engine)
    assert engine.generated_tokens_total - at_close <= OVER_HTTP_EXTRA
    assert engine.generated_tokens_total - before < LEAVER_TOKENS_MAX
