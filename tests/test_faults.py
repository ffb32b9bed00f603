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

from tests.conftest import AUTH, LiveServer, sse_events_from_lines

BOOM = "MELEDAK-SEKARANG"  # generation raises before the first token
BOOM_LATER = "MELEDAK-NANTI"  # generation raises after a few tokens were streamed
TOKFAIL = "TOKENISASI-GAGAL"


class FaultyGenerate:
    """`model.generate` that raises for prompts carrying a marker, like a CUDA fault would."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.original = model.generate
        self.tokenizer = tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prompt = self.tokenizer.decode(kwargs["input_ids"][0])
        if BOOM in prompt:
            raise RuntimeError("CUDA error: device-side assert triggered (forced by test)")
        if BOOM_LATER in prompt:
            calls = 0

            def bomb(*_args: Any, **_kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls > 3:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered (forced by test)")
                return False

            kwargs["stopping_criteria"].append(bomb)
        return self.original(*args, **kwargs)


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


async def test_a_failing_generation_fails_alone(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = live_server.engine
    monkeypatch.setattr(engine.model, "generate", FaultyGenerate(engine.model, engine.tokenizer))
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as http:
        failing_json = http.post("/api/v1/generate-text", json={"text": BOOM, "max_new_tokens": 8}, headers=AUTH)
        results = await asyncio.gather(
            failing_json, spec_sse(http, BOOM_LATER), oai_sse(http, BOOM_LATER), *(normal(http, i) for i in range(4))
        )
        json_failure, spec_events, oai_datas, *others = results

        assert json_failure.status_code == 500
        assert json_failure.json() == {"detail": "generation failed: RuntimeError"}
        assert "CUDA" not in json_failure.text and "Traceback" not in json_failure.text

        # Mid-stream: the text so far, then one error event; no `complete` is claimed.
        names = [name for name, _ in spec_events]
        assert names.count("delta") >= 1 and names[-1] == "error" and "complete" not in names
        assert json.loads(spec_events[-1][1]) == {"detail": "generation failed: RuntimeError", "status": 500}
        assert json.loads(oai_datas[-1])["error"]["type"] == "server_error"
        assert "[DONE]" not in oai_datas and len(oai_datas) >= 2

        assert all(r.status_code == 200 for r in others), [r.text for r in others]
        monkeypatch.undo()
        assert (await normal(http, 99)).status_code == 200
        assert (await http.get("/health")).status_code == 200


async def test_a_failing_tokenizer_fails_alone(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    builder = live_server.engine.prompt_builder
    monkeypatch.setattr(builder, "tokenizer", FaultyTokenizer(builder.tokenizer))
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as http:
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


def test_a_slow_reader_does_not_hold_up_anyone(live_server: LiveServer) -> None:
    """A client that reads its stream a few bytes at a time: the others are served meanwhile, the model is
    freed when its generation ends (not when the reader catches up), and the reader still gets it all."""
    host, port = live_server.base_url.removeprefix("http://").split(":")
    body = json.dumps({"text": "Ceritakan tentang Jawa.", "max_new_tokens": 48, "temperature": 0, "stream": True})
    request = (
        f"POST /api/v1/generate-text HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.connect((host, int(port)))
    slow.settimeout(30)
    slow.sendall(request)
    received = slow.recv(16)  # the response has started; from here on, read at a trickle
    try:
        started = time.monotonic()
        with httpx.Client(base_url=live_server.base_url, timeout=60) as http:
            for index in range(3):
                response = http.post("/api/v1/chat", json={"text": f"Halo {index}", "max_new_tokens": 4}, headers=AUTH)
                assert response.status_code == 200
                received += slow.recv(16)
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 60
        while b"event: complete" not in received or not received.endswith(b"0\r\n\r\n"):  # last chunk
            assert time.monotonic() < deadline, received[-300:]
            chunk = slow.recv(64)
            assert chunk, "connection closed early"
            received += chunk
            time.sleep(0.01)
    finally:
        slow.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert b"event: delta" in received and b"event: error" not in received
