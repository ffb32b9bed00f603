"""Faults fail one request, never the service: a generation that raises (before or mid-stream), a tokenizer
that raises, and a client that reads slowly, each while other clients are being served, over the wire."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import httpx
import pytest

from inference.model.loading import LoadedModel
from tests.helpers import (
    AUTH,
    ForcedFault,
    LiveServer,
    both_engines,
    engine_for,
    sse_events_from_lines,
    start_live_server,
)
from webapp.settings import Settings

pytestmark = both_engines  # the engine users get (batched), and the sequential one: the same behaviour

BOOM = "MELEDAK-SEKARANG"  # generation raises before the first token
BOOM_LATER = "MELEDAK-NANTI"  # generation raises after a few tokens were streamed
TOKFAIL = "TOKENISASI-GAGAL"
# Greedy, it runs past 700 tokens (measured, alone, with the int4 path GGUF_INT4 serves single streams with).
LONG_PROMPT = "Tulis esai yang sangat panjang tentang sejarah Indonesia, dari zaman kerajaan sampai sekarang."
SLOW_READER_TOKENS = 700


class FaultyTokenizer:
    """The engine's tokenizer, raising for text that carries a marker."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        if TOKFAIL in text:
            raise RuntimeError("tokenizer exploded (forced by test)")
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


async def spec_sse(http: httpx.AsyncClient, text: str, tokens: int = 24) -> list[tuple[str, str]]:
    body = {"text": text, "max_new_tokens": tokens, "temperature": 0, "stream": True}
    async with http.stream("POST", "/api/v1/generate-text", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines()]
    return list(sse_events_from_lines(lines))


async def oai_sse(http: httpx.AsyncClient, text: str) -> list[str]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 24, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines()]
    return [data for _, data in sse_events_from_lines(lines)]


async def normal(http: httpx.AsyncClient, index: int) -> httpx.Response:
    body = {"text": f"Halo {index}, apa kabar?", "max_new_tokens": 4}
    return await http.post("/api/v1/chat", json=body, headers=AUTH)


GENERATION_FAILED = {"detail": "generation failed: RuntimeError", "status": 500}


async def test_a_prompt_that_fails_fails_alone(live_server: LiveServer) -> None:
    """A fault at a request's prompt (its prefill) fails that request only, on both engines: the batched engine
    rolls its shared pass back and reruns the other parts without it."""
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=600) as http:
        with ForcedFault(live_server.engine, BOOM):
            failing_json, failing_sse, *others = await asyncio.gather(
                http.post("/api/v1/generate-text", json={"text": BOOM, "max_new_tokens": 8}, headers=AUTH),
                http.post("/api/v1/chat", json={"text": BOOM, "stream": True}, headers=AUTH),
                *(normal(http, i) for i in range(4)),
            )
        assert failing_json.status_code == 500
        assert failing_json.json() == {"detail": "generation failed: RuntimeError"}
        assert "CUDA" not in failing_json.text and "Traceback" not in failing_json.text
        # Streaming: the stream had started (admission passed), so no text, then one error event.
        assert failing_sse.status_code == 200
        assert list(sse_events_from_lines(failing_sse.text.splitlines())) == [("error", json.dumps(GENERATION_FAILED))]
        assert [r.status_code for r in others] == [200] * 4, [r.text for r in others]
        assert (await normal(http, 99)).status_code == 200
        assert (await http.get("/health")).status_code == 200


async def test_a_generation_failing_mid_stream_ends_in_an_error_event(live_server: LiveServer) -> None:
    """A fault after a few tokens: the text so far, then one error event, and no `complete` is claimed.

    The sequential engine runs one generation at a time, so the others are untouched. The batched engine's fault
    is in a forward pass that every running row shares: nobody can tell whose fault it was, so the rows are run again
    in halves and only the failing request's rows fail (tests/test_fault_isolation.py); the others are served."""
    engine = live_server.engine
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=600) as http:
        with ForcedFault(engine, BOOM_LATER, after=3):
            spec_events, oai_datas, *others = await asyncio.gather(
                spec_sse(http, BOOM_LATER), oai_sse(http, BOOM_LATER), *(normal(http, i) for i in range(4))
            )
        names = [name for name, _ in spec_events]
        assert names.count("delta") >= 1 and names[-1] == "error" and "complete" not in names
        assert json.loads(spec_events[-1][1]) == GENERATION_FAILED
        assert json.loads(oai_datas[-1])["error"]["type"] == "server_error"
        assert "[DONE]" not in oai_datas and len(oai_datas) >= 2
        assert [response.status_code for response in others] == [200] * 4, [r.text for r in others]
        assert engine.running == 0
        assert [(await normal(http, 90 + i)).status_code for i in range(3)] == [200] * 3
        assert (await http.get("/health")).status_code == 200


async def test_a_failing_tokenizer_fails_alone(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    builder = live_server.engine.prompt_builder
    monkeypatch.setattr(builder, "tokenizer", FaultyTokenizer(builder.tokenizer))
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=600) as http:
        results = await asyncio.gather(
            http.post("/api/v1/generate-text", json={"text": TOKFAIL}, headers=AUTH),
            http.post("/api/v1/chat", json={"text": "hi", "system_message": TOKFAIL, "stream": True}, headers=AUTH),
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TOKFAIL}]}, headers=AUTH),
            *(normal(http, i) for i in range(3)),
        )
        spec, spec_stream, oai, *others = results
        for response in (spec, spec_stream):
            assert response.status_code == 400 and response.headers["content-type"] == "application/json"
            assert response.json() == {"detail": "the prompt could not be tokenized: RuntimeError"}
        assert oai.status_code == 400 and "could not be tokenized" in oai.json()["error"]["message"]
        assert "exploded" not in spec.text + spec_stream.text + oai.text
        assert all(r.status_code == 200 for r in others)
        assert "prompt tokenization failed" in caplog.text  # the operator sees it, with the traceback
        monkeypatch.undo()
        assert (await normal(http, 99)).status_code == 200


def test_a_slow_reader_does_not_hold_up_anyone(
    settings: Settings, embedded_model: LoadedModel, engine_kind: str
) -> None:
    """A client that reads a long stream a few bytes at a time: the others are served, the model is freed when
    its generation ends (not when the reader catches up), and the reader still gets it all.

    The reply (a /v1 chunk per word, ~200 bytes each) is well over what the buffers between the model and this
    reader hold: the reader's 1 KB receive buffer, the server's send buffer (fixed at 4 KB here; Linux would grow it
    to 4 MB on loopback) and uvicorn's 64 KB of write buffer. So the server really does wait on this reader."""
    # The sequential engine queues the short requests behind the whole long generation: on a busy CI machine (many
    # engines' OpenMP teams alive in this process) that took more than the default 60 s QUEUE_TIMEOUT once.
    patient = settings.model_copy(update={"queue_timeout": 600.0})
    live = start_live_server(patient, engine_for(patient, embedded_model, engine_kind), send_buffer_bytes=4096)
    engine = live.engine
    host, port = live.base_url.removeprefix("http://").split(":")
    with httpx.Client(base_url=live.base_url, timeout=600) as http:  # this machine's speed, for the hang guard
        started = time.monotonic()
        warm = http.post("/api/v1/generate-text", json={"text": LONG_PROMPT, "max_new_tokens": 16}, headers=AUTH)
        seconds_per_token = (time.monotonic() - started) / warm.json()["output_length"]
    hang_guard_s = max(60.0, 10 * SLOW_READER_TOKENS * seconds_per_token)
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": SLOW_READER_TOKENS,
            "temperature": 0,
            "stream": True,
        }
    )
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.connect((host, int(port)))
    slow.settimeout(hang_guard_s)
    slow.sendall(request)
    received = slow.recv(16)  # the response has started; from here on, read at a trickle
    try:
        with httpx.Client(base_url=live.base_url, timeout=hang_guard_s) as http:
            for index in range(3):  # the sequential engine serves these once the long generation has ended
                response = http.post("/api/v1/chat", json={"text": f"Halo {index}", "max_new_tokens": 4}, headers=AUTH)
                assert response.status_code == 200
                received += slow.recv(16)
        deadline = time.monotonic() + hang_guard_s
        while engine.running:  # the long generation ends while the reader reads nothing more ...
            assert time.monotonic() < deadline, "the generation waits for its reader"
            time.sleep(0.05)
        assert len(received) < 1024  # ... having read only a sliver of it
        while not received.endswith(b"0\r\n\r\n"):  # the last chunk of the chunked body
            chunk = slow.recv(65536)
            assert chunk, "connection closed early"
            received += chunk
    finally:
        slow.close()
        live.server.should_exit = True
    assert received.startswith(b"HTTP/1.1 200")
    print(f"slow reader: {len(received)} bytes")
    assert len(received) > 96 * 1024, len(received)  # ~1.4x what the buffers hold
    assert b"data: [DONE]" in received and b'"finish_reason":"length"' in received
    assert b'"error"' not in received
