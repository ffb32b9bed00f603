"""The load generator (bench/loadgen.py) against real loopback servers, so the script cannot rot.

Our real server (conftest's live_server: sequential engine, embedded model, free loopback port), driven
over HTTP by 2 concurrent streaming clients on both APIs; plus a tiny fake server that streams the OpenAI
and documented SSE formats with token counts that differ from the chunk counts, to check that tokens come
from the server's usage.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench import loadgen
from tests.conftest import API_KEY, LiveServer

PROMPTS = [loadgen.Prompt("id", "Apa ibu kota Indonesia?"), loadgen.Prompt("en", "Name a large island.")]


@contextmanager
def serving(app: Any) -> Iterator[int]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields the port."""
    port = loadgen.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def run(
    target: loadgen.Target, concurrency: int, requests: int, max_tokens: int = 4, pid: int | None = None
) -> loadgen.RunReport:
    return asyncio.run(
        loadgen.run_load(
            target, PROMPTS, concurrency=concurrency, requests=requests, max_tokens=max_tokens, timeout_s=120, pid=pid
        )
    )


# --- our real server ----------------------------------------------------------------------------------------------


def _port(live_server: LiveServer) -> int:
    port = urlsplit(live_server.base_url).port
    assert port is not None
    return port


def test_loadgen_against_our_openai_endpoint(live_server: LiveServer) -> None:
    target = loadgen.target_for_ours(_port(live_server), "openai", API_KEY)
    report = run(target, concurrency=2, requests=2, pid=os.getpid())  # the live server runs in this process
    assert report.errors == 0, report.error_kinds
    assert report.ok == 2
    assert report.token_source == "usage"
    assert 2 <= report.output_tokens <= 8  # 1..4 tokens each, as the server counted them
    assert all(report.texts)
    assert report.aggregate_tok_s > 0 and report.requests_per_s > 0 and report.per_stream_tok_s
    assert report.ttft_p50_s is not None and report.latency_p50_s is not None
    assert report.ttft_p50_s <= report.latency_p50_s
    assert report.peak_rss_mb is not None and report.peak_rss_mb > 100  # the model is in this process
    assert report.cpu_ms_per_token is not None and report.cpu_ms_per_token > 0


def test_loadgen_against_our_documented_endpoint(live_server: LiveServer) -> None:
    target = loadgen.target_for_ours(_port(live_server), "spec", API_KEY, spec_path="/api/v1/chat")
    report = run(target, concurrency=2, requests=2)
    assert report.errors == 0, report.error_kinds
    assert report.token_source == "output_length"
    assert 2 <= report.output_tokens <= 8
    assert all(report.texts)
    assert report.ttft_p95_s is not None and report.latency_p95_s is not None
    assert report.ttft_p95_s <= report.latency_p95_s


def test_readiness_probe_and_wrong_key(live_server: LiveServer) -> None:
    port = _port(live_server)
    asyncio.run(loadgen.wait_ready(loadgen.target_for_ours(port, "openai", API_KEY), timeout_s=30))
    report = run(loadgen.target_for_ours(port, "openai", "wrong-key"), concurrency=1, requests=1)
    assert report.errors == 1 and report.error_kinds == {"HTTP 401": 1}


# --- a fake server for the wire formats ---------------------------------------------------------------------------

FAKE_PIECES = ["Ja", "kar", "ta."]
FAKE_TOKENS = 5  # deliberately not the number of chunks


def _sse(payload: Any, event: str | None = None) -> str:
    import json

    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def fake_app() -> Starlette:

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def chat_completions(request: Request) -> Response:
        body = await request.json()
        assert body["model"] == "fake-model" and body["temperature"] == 0
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(FAKE_PIECES)}
            usage = {"prompt_tokens": 3, "completion_tokens": FAKE_TOKENS, "total_tokens": 8}
            return JSONResponse({"choices": [{"index": 0, "message": message}], "usage": usage})
        assert body["stream_options"] == {"include_usage": True}

        async def events() -> AsyncIterator[str]:
            base = {"id": "c1", "object": "chat.completion.chunk", "model": "fake-model"}
            yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for piece in FAKE_PIECES:
                await asyncio.sleep(0.01)
                yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
            yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            usage = {"prompt_tokens": 3, "completion_tokens": FAKE_TOKENS, "total_tokens": 8}
            yield _sse({**base, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def generate_text(request: Request) -> Response:
        body = await request.json()
        if body["text"] == "busy":
            return JSONResponse({"detail": "busy"}, 503, headers={"Retry-After": "1"})

        async def events() -> AsyncIterator[str]:
            for piece in FAKE_PIECES:
                await asyncio.sleep(0.01)
                yield _sse({"delta": piece})
            final = {"generated_text": "".join(FAKE_PIECES), "output_length": FAKE_TOKENS, "input_length": 9}
            yield _sse(final, event="done")

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/api/v1/generate-text", generate_text, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def fake_port() -> Iterator[int]:
    with serving(fake_app()) as port:
        yield port


def test_openai_stream_counts_usage_tokens(fake_port: int) -> None:
    target = loadgen.Target(f"http://127.0.0.1:{fake_port}/v1", api="openai", api_key="k")
    report = run(target, concurrency=2, requests=3)
    assert target.model == "fake-model"  # discovered from GET /v1/models
    assert report.errors == 0, report.error_kinds
    assert report.output_tokens == 3 * FAKE_TOKENS and report.token_source == "usage"
    assert report.texts == ["Jakarta."] * 3
    assert report.ttft_p50_s is not None and report.latency_p50_s is not None
    assert 0 < report.ttft_p50_s < report.latency_p50_s  # the first delta came before the end of the stream


def test_spec_stream_counts_output_length(fake_port: int) -> None:
    target = loadgen.Target(f"http://127.0.0.1:{fake_port}", api="spec")
    report = run(target, concurrency=2, requests=2)
    assert report.errors == 0, report.error_kinds
    assert report.output_tokens == 2 * FAKE_TOKENS and report.token_source == "output_length"
    assert report.texts == ["Jakarta."] * 2
    assert report.ttft_p50_s is not None and report.latency_p50_s is not None
    assert report.ttft_p50_s < report.latency_p50_s


def test_errors_are_counted_not_raised(fake_port: int) -> None:
    target = loadgen.Target(f"http://127.0.0.1:{fake_port}", api="spec")
    prompts = [loadgen.Prompt("en", "busy"), loadgen.Prompt("id", "Halo")]
    report = asyncio.run(loadgen.run_load(target, prompts, concurrency=2, requests=4, max_tokens=4, timeout_s=60))
    assert (report.ok, report.errors) == (2, 2)
    assert report.error_kinds == {"HTTP 503": 2}
    assert report.output_tokens == 2 * FAKE_TOKENS


def test_only_loopback_addresses() -> None:
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:80"):
        loadgen.require_loopback(url)
    for url in ("http://10.0.0.2:8000/v1", "http://example.com/v1", "http://0.0.0.0:8000"):
        with pytest.raises(loadgen.BenchError):
            loadgen.require_loopback(url)


def test_summary_ratios_and_percentiles() -> None:
    assert loadgen.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert loadgen.percentile([3.0, 1.0, 2.0, 4.0], 95) == 4.0

    def report(label: str, conc: int, tok_s: float, *ttfts: float) -> loadgen.RunReport:
        results = [
            loadgen.RequestResult(ok=True, latency_s=1.0, ttft_s=ttft, output_tokens=int(tok_s) // len(ttfts))
            for ttft in ttfts
        ]
        return loadgen.summarise(label, conc, results, wall_s=1.0, peak_rss_mb=None)

    # One client: short prompts answer first in 0.1 s, the long one in 0.2 s; eight clients: 0.3 s at worst.
    text = loadgen.summary_ratios(
        [
            report("ours-sequential", 1, 20, 0.1, 0.1, 0.1, 0.2),
            report("ours-sequential", 8, 20, 2.0),
            report("ours-batched", 1, 20, 0.1, 0.1, 0.1, 0.2),
            report("ours-batched", 8, 140, 0.15, 0.3),
        ]
    )
    assert "7.00x PASS" in text and "no errors: 0 PASS" in text
    assert "single-request TTFT p95, same prompts: 1.50x PASS" in text  # 0.3 / 0.2, not 0.3 / 0.1
    assert "TTFT p95 at 8 / TTFT p95 at 1 (same prompts) = 1.50x; / TTFT p50 at 1 = 3.00x" in text


def test_the_summary_baseline_sends_the_eight_client_prompts_one_at_a_time() -> None:
    args = loadgen.build_parser().parse_args(["--summary"])
    assert loadgen.requests_for(1, args) == loadgen.requests_for(8, args) == 16
    assert loadgen.requests_for(4, args) == 8
    single = loadgen.build_parser().parse_args(["--start-ours", "-c", "1"])
    assert loadgen.requests_for(1, single) == 4


def test_cpu_kernels_bench_times_both_kernels() -> None:
    from bench import cpu_kernels
    from inference.cpu_kernels import packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN linear packing")
    plain, packed = cpu_kernels.time_linear(64, 32, repeat=3)
    assert plain > 0 and packed > 0
