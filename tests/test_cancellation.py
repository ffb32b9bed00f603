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

from inference import BatchedEngine, GenerationRequest, Message, TextDelta
from tests.helpers import AUTH, LiveServer, result_of, sse_events

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
def default_engine(engine: BatchedEngine) -> BatchedEngine:
    """The engine users get (the shared fixture): default settings (bf16, FAST_DECODE, MAX_BATCH=auto)."""
    assert isinstance(engine, BatchedEngine)
    return engine


@pytest.fixture(scope="module")
def default_server(live_server: LiveServer) -> LiveServer:
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


@pytest.mark.parametrize("leave", ["aclose", "drop", "drop unread"])
async def test_a_stream_left_mid_reply_frees_its_row(default_engine: BatchedEngine, leave: str) -> None:
    """`aclose`: the consumer closes its stream after 3 deltas; `drop`: it just lets go of it (no aclose) and garbage
    collection cancels the row; `drop unread`: the same before reading anything, once the row generates. Either way
    the row stops within a step."""
    before = default_engine.generated_tokens_total
    stream = await default_engine.submit(long_request())
    if leave == "drop unread":
        while default_engine.generated_tokens_total == before:  # the decode thread admitted it and it generates
            await asyncio.sleep(0.001)
    else:
        await read_deltas(stream, 3)
    assert default_engine.running == 1
    if leave == "aclose":
        await stream.aclose()  # type: ignore[attr-defined]
    else:
        del stream
        gc.collect()
    at_leave = default_engine.generated_tokens_total
    await until_idle(default_engine)
    assert default_engine.generated_tokens_total - at_leave <= IN_PROCESS_EXTRA
    assert default_engine.generated_tokens_total - before < LEAVER_TOKENS_MAX


async def test_a_leaver_beside_other_rows_stops_counting(default_engine: BatchedEngine) -> None:
    """The row that left goes while its neighbours keep generating (they are no cover for a row kept alive).

    The neighbours run LONG_PROMPT uncancelled to their limit, more tokens than any bound in this module allows: had
    the prompt ended by itself within a bound, a cancel that did not work would go unseen.
    """
    before = default_engine.generated_tokens_total
    leaver = await default_engine.submit(long_request())
    neighbours = [await default_engine.submit(long_request(max_new_tokens=NEIGHBOUR_TOKENS)) for _ in range(2)]
    tasks = [asyncio.ensure_future(result_of(stream)) for stream in neighbours]
    await read_deltas(leaver, 3)
    await leaver.aclose()  # type: ignore[attr-defined]
    results = await asyncio.gather(*tasks)
    await until_idle(default_engine)
    assert [(result.output_length, result.finish_reason) for result in results] == [(NEIGHBOUR_TOKENS, "length")] * 2
    leaver_tokens = default_engine.generated_tokens_total - before - sum(result.output_length for result in results)
    # The leaver's tokens: those generated while it read its 3 deltas, and not the hundreds it asked for.
    assert 3 <= leaver_tokens < LEAVER_TOKENS_MAX, leaver_tokens


# ---- over HTTP, through a real uvicorn server ----


def leave_after(server: LiveServer, path: str, body: dict[str, Any], is_delta: Any, count: int = 3) -> int:
    """POST a streaming `body`, read `count` deltas, hang up; the engine's token count when the client left."""
    with httpx.stream("POST", f"{server.base_url}{path}", headers=AUTH, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        deltas = 0
        for event, data in sse_events(response):
            assert data != "[DONE]" and event != "complete", "the stream ended by itself"
            deltas += bool(is_delta(event, data))
            if deltas == count:
                break
        else:
            raise AssertionError("the stream ended early")
    return server.engine.generated_tokens_total  # leaving the block closed the connection


def test_spec_sse_disconnect_frees_the_row(default_server: LiveServer) -> None:
    engine = default_server.engine
    before = engine.generated_tokens_total
    body = {"text": LONG_PROMPT, "max_new_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    at_close = leave_after(default_server, "/api/v1/generate-text", body, lambda event, _data: event == "delta")
    wait_idle(engine)
    assert engine.generated_tokens_total - at_close <= OVER_HTTP_EXTRA
    assert engine.generated_tokens_total - before < LEAVER_TOKENS_MAX


def test_openai_stream_disconnect_frees_the_row(default_server: LiveServer) -> None:
    engine = default_server.engine
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

    at_close = leave_after(default_server, "/v1/chat/completions", body, is_delta)
    wait_idle(engine)
    assert engine.generated_tokens_total - at_close <= OVER_HTTP_EXTRA
    assert engine.generated_tokens_total - before < LEAVER_TOKENS_MAX
