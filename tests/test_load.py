"""Load without loss: the real service (`python app.py`, its own process) under 32 concurrent clients.

Rounds of 32 clients x 4 requests, mixed JSON and SSE on the documented and the OpenAI routes, a few clients
hanging up mid-stream. Every request must get a complete answer or a clear 503, none may hang past a
bound, the server must answer normally afterwards, its memory (RSS of the server process) must stop growing
once the same load has run a few times, and no key may appear in its log (run at DEBUG).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, free_port, sse_events_from_lines

KEY = "sk-load-test-4b1d-9e0c-secret"
HEADERS = {"Authorization": f"Bearer {KEY}"}
CLIENTS, REQUESTS_PER_CLIENT = 32, 4
MAX_NEW_TOKENS = 4
HANG_UP_CLIENTS = {3, 11, 19, 27}  # these leave their streaming requests after the first delta
HUNG_UP_TOKENS = 200  # what a hung-up stream asks for: it would run that long if it were not cancelled
TOKENS_AFTER_HANG_UP = 50  # at most this many more tokens of a stream whose client left (a few steps, usually)
RSS_TOLERANCE_BYTES = 80 * 1024 * 1024
ROUNDS = 4


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    rss_samples: list[int] = field(default_factory=list)

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("load") / "server.log"
    env = {
        **os.environ,
        "MODEL_ID": "embedded",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_KEYS": KEY,
        "LOG_LEVEL": "debug",
        "MAX_NEW_TOKENS_CAP": "256",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    live = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"server exited: {log_path.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, "server not ready in 180 s"
            try:
                if httpx.get(f"{live.base_url}/v1/models", headers=HEADERS, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield live
    finally:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def body_for(kind: str, client: int, request: int, hang_up: bool) -> tuple[str, dict]:
    text = f"Klien {client} pertanyaan {request}: sebutkan satu kota di Indonesia."
    tokens = HUNG_UP_TOKENS if hang_up else MAX_NEW_TOKENS
    if kind.startswith("spec"):
        path = "/api/v1/chat" if client % 2 else "/api/v1/generate-text"
        return path, {"text": text, "max_new_tokens": tokens, "stream": kind == "spec_sse"}
    messages = [{"role": "user", "content": text}]
    return "/v1/chat/completions", {"messages": messages, "max_tokens": tokens, "stream": kind == "oai_sse"}


async def one_request(http: httpx.AsyncClient, client: int, request: int) -> str:
    """The outcome: 'ok', 'ok-stream', 'hung-up', '503', or a description of what went wrong."""
    kinds = ["spec_json", "spec_sse", "oai_json", "oai_sse"]
    kind = kinds[(client + request) % 4]
    hang_up = client in HANG_UP_CLIENTS and kind.endswith("sse")
    path, body = body_for(kind, client, request, hang_up)
    async with http.stream("POST", path, json=body, headers=HEADERS) as response:
        if response.status_code == 503:
            payload = json.loads(await response.aread())
            ok = response.headers.get("retry-after") and (payload.get("detail") or payload.get("error"))
            return "503" if ok else f"unclear 503 {payload}"
        if response.status_code != 200:
            return f"{path} {response.status_code}: {(await response.aread())[:200]!r}"
        if not kind.endswith("sse"):
            payload = json.loads(await response.aread())
            text = payload["generated_text"] if kind == "spec_json" else payload["choices"][0]["message"]["content"]
            used = payload["output_length"] if kind == "spec_json" else payload["usage"]["completion_tokens"]
            return "ok" if isinstance(text, str) and 0 < used <= MAX_NEW_TOKENS else f"bad body {payload}"
        lines: list[str] = []
        async for line in response.aiter_lines():
            lines.append(line)
            if hang_up and line.startswith("data: {"):
                data = json.loads(line[5:])
                if "delta" in data or (data.get("choices") and data["choices"][0]["delta"].get("content")):
                    return "hung-up"  # leaving the block closes the connection mid-stream
    events = list(sse_events_from_lines(lines))
    if kind == "spec_sse":
        deltas = "".join(json.loads(d)["delta"] for e, d in events if e == "delta")
        finals = [json.loads(d) for e, d in events if e == "complete"]
        complete = len(finals) == 1 and finals[0]["generated_text"] == deltas and events[-1][0] == "complete"
        return "ok-stream" if complete else f"incomplete stream {events[-3:]}"
    datas = [d for _, d in events]
    complete = datas and datas[-1] == "[DONE]" and any(json.loads(d)["choices"][0]["finish_reason"] for d in datas[:-1])
    return "ok-stream" if complete else f"incomplete stream {datas[-3:]}"


async def client_session(base_url: str, client: int, bound_s: float) -> list[tuple[str, float]]:
    outcomes = []
    async with httpx.AsyncClient(base_url=base_url, timeout=bound_s) as http:
        for request in range(REQUESTS_PER_CLIENT):
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(one_request(http, client, request), bound_s)
            except TimeoutError:
                outcome = f"hung past {bound_s:.0f}s"
            except httpx.HTTPError as error:
                outcome = f"transport error {error!r}"
            outcomes.append((outcome, time.monotonic() - started))
    return outcomes


async def sample_rss(server: Server, stop: asyncio.Event) -> None:
    while not stop.is_set():
        server.rss_samples.append(server.rss())
        await asyncio.sleep(0.5)


async def decoded_tokens_and_running(http: httpx.AsyncClient) -> tuple[float, float]:
    """The engine's own counts, from /metrics: tokens generated (cancelled generations included), running now."""
    families = text_string_to_metric_families((await http.get("/metrics", headers=HEADERS)).text)
    values = {sample.name: sample.value for family in families for sample in family.samples}
    return values["sahabat_engine_decoded_tokens_total"], values["sahabat_engine_running_requests"]


async def warm_up(server: Server) -> float:
    """Allocations that happen once (first SSE, first of each route) before the baseline is taken.

    Returns how long one burst of every client took here, the yardstick for a request's hang guard."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as http:
        for client in (2, 3):  # each kind of request once, a hang-up included
            for request in range(4):
                outcome = await one_request(http, client, request)
                assert outcome in ("ok", "ok-stream", "hung-up"), outcome
        # Every client once, concurrently: the batched engine's buffers, the queue and the allocator's
        # arenas grow to their working size here, so the check below is for growth under load (a leak).
        started = time.monotonic()
        outcomes = await asyncio.gather(*(one_request(http, client, 0) for client in range(CLIENTS)))
        assert all(outcome in ("ok", "ok-stream", "hung-up") for outcome in outcomes), outcomes
        return time.monotonic() - started


async def test_32_concurrent_clients_lose_nothing(load_server: Server) -> None:
    burst_s = await warm_up(load_server)
    # A round is REQUESTS_PER_CLIENT such bursts back to back; a request that takes ten times a whole round is hung
    # (a hang guard measured on this machine, whatever its load, not a speed requirement).
    bound_s = max(60.0, 10 * REQUESTS_PER_CLIENT * burst_s)
    await asyncio.sleep(1)
    baseline = load_server.rss()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(load_server, stop))
    # The same load ROUNDS times. Shape-dependent memory (oneDNN kernels and scratch space for each new prompt
    # and batch shape, the allocator's arenas) grows over the first rounds and then stays (measured: +64, +127,
    # +33, +2 MiB over 4 rounds), while a leak keeps growing. So the check is across the last two rounds.
    after_rounds: list[int] = []
    for _round in range(ROUNDS):
        async with httpx.AsyncClient(base_url=load_server.base_url, timeout=60) as http:
            decoded_before, _ = await decoded_tokens_and_running(http)
        started = time.monotonic()
        results = await asyncio.gather(*(client_session(load_server.base_url, c, bound_s) for c in range(CLIENTS)))
        elapsed = time.monotonic() - started

        outcomes = [outcome for session in results for outcome, _ in session]
        slowest = max(duration for session in results for _, duration in session)
        counts = Counter(o if o in ("ok", "ok-stream", "hung-up", "503") else "FAILED" for o in outcomes)
        failures = [o for o in outcomes if o not in ("ok", "ok-stream", "hung-up", "503")]
        assert not failures, failures[:10]
        assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT
        assert counts["hung-up"] == len(HANG_UP_CLIENTS) * 2  # 2 streaming requests each
        assert (
            counts["ok"] + counts["ok-stream"] >= 100
        )  # MAX_BATCH + MAX_QUEUE (16 + 32 on CPU) admit all 32 clients: no 503 expected

        # The server answers normally afterwards, with nothing left running from the hung-up streams: the model
        # generated the answered tokens and a few more for each stream whose client left, never what they asked for.
        async with httpx.AsyncClient(base_url=load_server.base_url, timeout=bound_s) as http:
            assert (await http.get("/health")).status_code == 200
            assert await one_request(http, 0, 0) == "ok"
            assert await one_request(http, 0, 1) == "ok-stream"
            decoded_after, running = await decoded_tokens_and_running(http)
        assert running == 0
        answered = (len(outcomes) - counts["hung-up"] + 2) * MAX_NEW_TOKENS
        decoded = decoded_after - decoded_before
        assert decoded <= answered + counts["hung-up"] * TOKENS_AFTER_HANG_UP, (decoded, answered)
        await asyncio.sleep(2)
        after_rounds.append(load_server.rss())
        print(
            f"\nload round {_round + 1}: {len(outcomes)} requests in {elapsed:.0f}s ({dict(counts)}), "
            f"slowest {slowest:.1f}s, {decoded:.0f} tokens decoded (answered at most {answered}), "
            f"RSS after {after_rounds[-1] / 2**20:.0f} MiB"
        )
    stop.set()
    await sampler

    first, final = after_rounds[-3], after_rounds[-1]
    peak = max(load_server.rss_samples)
    mib = 1024 * 1024
    rounds = " / ".join(f"{rss / mib:.0f}" for rss in after_rounds)
    print(f"RSS baseline {baseline / mib:.0f} MiB, peak {peak / mib:.0f} MiB, after the rounds {rounds} MiB")
    assert final - first < RSS_TOLERANCE_BYTES, (baseline / mib, first / mib, peak / mib, final / mib)

    log = load_server.log_path.read_text(errors="replace")
    assert "POST /api/v1/chat" in log or "POST /api/v1/generate-text" in log  # the log is really captured
    assert KEY not in log and KEY[8:] not in log
