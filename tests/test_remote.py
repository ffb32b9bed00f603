"""ENGINE=remote against a real upstream on loopback: a second instance of this service on the embedded model.

The front (ENGINE=remote) and the upstream (ENGINE=sequential) are real uvicorn servers; everything between
them goes over HTTP with the official openai client. Faults are forced by stopping the upstream server
(mid-stream and before start) and, for the shapes a real upstream cannot be made to produce on demand
(5xx, a stream cut before its finish, a template without a system role), by a small fake upstream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from inference import EngineNotReady, Message, UpstreamError
from inference.engines.remote import RemoteEngine, redact_url
from inference.model.loading import LoadedModel
from inference.text.prompt import fold_system_messages
from tests.helpers import (
    API_KEY,
    AUTH,
    ROOT,
    LiveServer,
    engine_for,
    free_port,
    openai_client,
    spec_stream_events,
    sse_events,
    start_live_server,
)
from webapp.settings import Settings
from webapp.ui.chat import ChatUI, banner_markdown, error_note

UPSTREAM_CAP = 1500  # the upstream's MAX_NEW_TOKENS_CAP; the front's is the default 2048
EMBEDDED_ID = "SmolLM2-135M-Instruct-Q4_1"
# Waits for something that takes milliseconds when it works: a limit that only ends a broken run, never a bound.
LIVENESS_S = 300.0
# What the cancellation tests ask the upstream for. Their prompts' greedy replies run past it (checked on the
# embedded model), so an upstream generation nobody cancels spends all of it, whatever the machine's speed; a
# cancelled one stops a few tokens after the client leaves.
LONG_TOKENS = 300


def remote_settings(url: str, health_interval_s: float = 2.0, **overrides: object) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        engine="remote",
        remote_url=url,
        remote_api_key=API_KEY,
        remote_health_interval_s=health_interval_s,
        **overrides,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def stop_server(live: LiveServer, *, abrupt: bool = False) -> None:
    """Stop a live server; `abrupt` drops open connections mid-response, as a crashed upstream would."""
    live.server.should_exit = True
    live.server.force_exit = abrupt
    port = int(live.base_url.rsplit(":", 1)[1])

    def closed() -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5)
        except httpx.HTTPError:
            return True
        return False

    wait_for(closed, 30, "server stop")


@pytest.fixture(scope="module")
def upstream_settings() -> Settings:
    return Settings(model_id="embedded", max_new_tokens_cap=UPSTREAM_CAP, _env_file=None)  # type: ignore[call-arg]


def start_upstream(upstream_settings: Settings, embedded_model: LoadedModel, port: int | None = None) -> LiveServer:
    return start_live_server(upstream_settings, engine_for(upstream_settings, embedded_model), port=port)


@pytest.fixture(scope="module")
def upstream(upstream_settings: Settings, embedded_model: LoadedModel) -> Iterator[LiveServer]:
    live = start_upstream(upstream_settings, embedded_model)
    yield live
    live.server.should_exit = True


@pytest.fixture(scope="module")
def front(upstream: LiveServer) -> Iterator[LiveServer]:
    settings = remote_settings(f"{upstream.base_url}/v1")
    engine = RemoteEngine(settings)
    live = start_live_server(settings, engine)
    wait_for(lambda: engine.ready, 30, "front ready")
    yield live
    live.server.should_exit = True


def post(live: LiveServer, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", headers=AUTH, json=body, timeout=timeout)


def upstream_spent(upstream: LiveServer, before: int) -> int:
    """Tokens the upstream generated since its total was `before`, once no generation runs there any more."""
    wait_for(lambda: upstream.engine.running == 0, LIVENESS_S, "the upstream's generation to end")
    return upstream.engine.generated_tokens_total - before


def assert_cancelled_upstream(spent: int) -> None:
    assert spent < LONG_TOKENS, f"the upstream generated all {spent} of {LONG_TOKENS} tokens: it was never cancelled"


# --- unit pieces -----------------------------------------------------------------------------------------------


def test_fold_system_messages_merges_each_system_turn_into_the_next_user_turn() -> None:
    messages = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("system", "Answer in Javanese."),
        Message("user", "How are you?"),
    ]
    assert fold_system_messages(messages) == [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Answer in Javanese.\n\nHow are you?"},
    ]


def test_redact_url_drops_credentials() -> None:
    assert redact_url("https://user:secret@vllm.internal:8000/v1?key=x") == "https://vllm.internal:8000/v1"


def test_remote_settings_need_a_url() -> None:
    with pytest.raises(ValueError, match="REMOTE_URL is required"):
        Settings(engine="remote", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="http"):
        Settings(engine="remote", remote_url="vllm:8000/v1", _env_file=None)  # type: ignore[call-arg]


# --- the front against the real upstream ---------------------------------------------------------------------


def test_front_reports_the_upstream_model(front: LiveServer) -> None:
    engine = front.engine
    assert engine.info is not None and engine.info.engine == "remote"
    assert engine.info.model_id == EMBEDDED_ID and engine.info.is_embedded_demo
    models = openai_client(front).models.list()
    assert [m.id for m in models.data] == [EMBEDDED_ID, "sahabat-ai"]  # the served id first, then the alias


@pytest.mark.parametrize("path", ["/api/v1/generate-text", "/api/v1/chat"])
def test_spec_routes_json_and_sse_match_the_upstream(front: LiveServer, upstream: LiveServer, path: str) -> None:
    body = {"text": "Sebutkan tiga pulau di Indonesia.", "max_new_tokens": 10, "temperature": 0}
    direct = post(upstream, path, body)
    through = post(front, path, body)
    assert direct.status_code == through.status_code == 200, through.text
    direct_body, through_body = direct.json(), through.json()
    # Same model, greedy: the same text; the same conversation (the chat system message is the front's,
    # the template the upstream's), so the same token counts, which come from the upstream's usage.
    assert through_body == direct_body
    assert 0 < through_body["output_length"] <= 10
    if path == "/api/v1/chat":
        assert through_body["full_conversation"][0]["role"] == "system"
    deltas, others, _ = spec_stream_events(front, path, {**body, "stream": True})
    assert len(deltas) >= 2
    assert [event for event, _ in others] == ["complete"]
    final = json.loads(others[0][1])
    assert final == direct_body and "".join(deltas) == final["generated_text"]


def test_openai_route_streamed_and_not(front: LiveServer, upstream: LiveServer) -> None:
    messages = [{"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": "Apa ibu kota Indonesia?"}]
    direct = openai_client(upstream).chat.completions.create(
        model="sahabat-ai", messages=messages, max_tokens=8, temperature=0
    )
    oai = openai_client(front)
    whole = oai.chat.completions.create(model="sahabat-ai", messages=messages, max_tokens=8, temperature=0)
    assert whole.model == EMBEDDED_ID
    assert whole.choices[0].message.content == direct.choices[0].message.content
    assert whole.choices[0].finish_reason == direct.choices[0].finish_reason
    assert whole.usage is not None and direct.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        direct.usage.prompt_tokens,
        direct.usage.completion_tokens,
    )
    chunks = list(
        oai.chat.completions.create(
            model="sahabat-ai",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_completions_go_to_the_upstreams_completions_route(front: LiveServer, upstream: LiveServer) -> None:
    """/v1/completions through the remote engine: each prompt is one upstream `completions` call (no chat
    template on either side), so the text, the finish and the usage are the upstream's, stream and not."""
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    direct = openai_client(upstream).completions.create(model="sahabat-ai", prompt=prompts, max_tokens=6, temperature=0)
    oai = openai_client(front)
    through = oai.completions.create(model="sahabat-ai", prompt=prompts, max_tokens=6, temperature=0, echo=True)
    assert through.model == EMBEDDED_ID
    assert [c.text for c in through.choices] == [p + c.text for p, c in zip(prompts, direct.choices, strict=True)]
    assert [c.finish_reason for c in through.choices] == [c.finish_reason for c in direct.choices]
    assert through.usage == direct.usage
    chunks = list(
        oai.completions.create(model="sahabat-ai", prompt=prompts[1], max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.choices[1].text


def test_sampling_parameters_reach_the_upstream(front: LiveServer, upstream: LiveServer) -> None:
    base = {"text": "Tulis puisi pendek tentang laut.", "max_new_tokens": 10, "temperature": 1.0}
    knobs = {"seed": 7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.2}
    direct = post(upstream, "/api/v1/generate-text", {**base, **knobs}).json()
    through = post(front, "/api/v1/generate-text", {**base, **knobs}).json()
    assert through["generated_text"] == direct["generated_text"]  # same seed and knobs, same sample
    other_seed = post(front, "/api/v1/generate-text", {**base, **knobs, "seed": 8}).json()
    assert other_seed["generated_text"] != through["generated_text"]
    # A stop sequence is applied upstream and its match is not returned.
    greedy = {"text": "Sebutkan nama-nama hari dalam seminggu.", "max_new_tokens": 20, "temperature": 0}
    full = post(front, "/api/v1/generate-text", greedy).json()["generated_text"]
    assert len(full) > 12
    stop = full[8:11]
    cut = post(front, "/api/v1/generate-text", {**greedy, "stop": [stop]}).json()["generated_text"]
    assert cut == full[: full.find(stop)]


def test_penalties_min_p_and_logprobs_go_through_the_upstream(front: LiveServer, upstream: LiveServer) -> None:
    fields: dict = {
        "model": "sahabat-ai",
        "messages": [{"role": "user", "content": "Write the word 'hello' ten times."}],
        "max_tokens": 12,
        "temperature": 0,
        "frequency_penalty": 1.0,
        "presence_penalty": 0.5,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": {"min_p": 0.1},
    }
    direct = openai_client(upstream).chat.completions.create(**fields)
    through = openai_client(front).chat.completions.create(**fields)
    assert through.choices[0].message.content == direct.choices[0].message.content
    plain = openai_client(front).chat.completions.create(**{**fields, "frequency_penalty": 0, "presence_penalty": 0})
    assert plain.choices[0].message.content != through.choices[0].message.content  # the penalties reached it
    got, want = through.choices[0].logprobs, direct.choices[0].logprobs
    assert got is not None and want is not None and got.content and want.content
    assert [(t.token, t.logprob, len(t.top_logprobs)) for t in got.content] == [
        (t.token, t.logprob, len(t.top_logprobs)) for t in want.content
    ]
    chunks = list(openai_client(front).chat.completions.create(**fields, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in got.content]


def test_what_the_upstream_refuses_is_our_400_with_its_message(front: LiveServer) -> None:
    body = {"text": "Halo", "max_new_tokens": UPSTREAM_CAP + 100}  # under the front's cap, over the upstream's
    response = post(front, "/api/v1/generate-text", body)
    assert response.status_code == 400
    assert "MAX_NEW_TOKENS_CAP" in response.json()["detail"] and str(UPSTREAM_CAP) in response.json()["detail"]
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(front).chat.completions.create(
            model="sahabat-ai", messages=[{"role": "user", "content": "hi"}], max_tokens=UPSTREAM_CAP + 100
        )
    assert "MAX_NEW_TOKENS_CAP" in raised.value.body["message"]
    assert raised.value.body["param"] == "max_tokens"  # the upstream's name for the field, passed on


def test_history_validation_stays_ours(front: LiveServer) -> None:
    bad = {"text": "Halo", "conversation_history": [{"role": "tool", "content": "x"}]}
    response = post(front, "/api/v1/chat", bad)
    assert response.status_code == 400 and "conversation_history" in response.json()["detail"]


def test_disconnect_cancels_the_upstream_generation(front: LiveServer, upstream: LiveServer) -> None:
    before = upstream.engine.generated_tokens_total
    body = {"text": "Tulis esai panjang tentang sejarah Indonesia.", "max_new_tokens": LONG_TOKENS, "temperature": 0}
    with httpx.stream(
        "POST", f"{front.base_url}/api/v1/generate-text", headers=AUTH, json={**body, "stream": True}, timeout=60
    ) as response:
        deltas = 0
        for event, _ in sse_events(response):
            deltas += event == "delta"
            if deltas == 3:
                break  # the client leaves mid-stream
    assert_cancelled_upstream(upstream_spent(upstream, before))
    # The abandoned stream's clean-up runs on the front's loop: it is soon not counted as running.
    wait_for(lambda: front.engine.running == 0, LIVENESS_S, "the front to let the abandoned stream go")
    after = post(front, "/api/v1/generate-text", {"text": "Halo", "max_new_tokens": 4, "temperature": 0})
    assert after.status_code == 200 and after.json()["output_length"] > 0


def test_openai_stream_disconnect_cancels_upstream(front: LiveServer, upstream: LiveServer) -> None:
    before = upstream.engine.generated_tokens_total
    oai = openai_client(front)
    stream = oai.chat.completions.create(
        model="sahabat-ai",
        messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=LONG_TOKENS,
        temperature=0,
        stream=True,
    )
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    stream.close()
    assert_cancelled_upstream(upstream_spent(upstream, before))
    completion = oai.chat.completions.create(
        model="sahabat-ai", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert completion.choices[0].message.content


def test_chat_page_function_streams_and_its_stop_cancels_upstream(upstream: LiveServer) -> None:
    settings = remote_settings(f"{upstream.base_url}/v1")

    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    async def run() -> tuple[list[str], list[dict], int]:
        engine = RemoteEngine(settings)
        await engine.start()
        try:
            ui = ChatUI(engine, settings)
            replies = [
                chat[1]["content"]
                async for chat in ui.respond(user("Halo, apa kabar?"), "", 10, 0.0, 1.0, 0, 1.0, None, "id")
                if len(chat) > 1
            ]
            before = upstream.engine.generated_tokens_total
            stream = ui.respond(
                user("Tulis cerita yang sangat panjang."), "", LONG_TOKENS, 0.0, 1.0, 0, 1.0, None, "id"
            )
            for _ in range(3):
                await anext(stream)
            await stream.aclose()  # the Stop button
            spent = await asyncio.to_thread(upstream_spent, upstream, before)
            assert engine.running == 0
            final = [c async for c in ui.respond(user("Halo"), "Jawab singkat.", 3, 0.0, 1.0, 0, 1.0, None, "id")][-1]
            return replies, final, spent
        finally:
            await engine.aclose()

    replies, final, spent = asyncio.run(run())
    texts = replies[:-1]  # the last value is the reply next to its stats note
    assert len(texts) >= 2 and texts[-1].strip()
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert [m["role"] for m in final] == ["user", "assistant", "assistant"] and final[1]["content"]
    assert_cancelled_upstream(spent)


# --- the upstream goes away and comes back -------------------------------------------------------------------


def record_probes(engine: RemoteEngine, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, bool]]:
    """(start time, success) of each health probe `engine` makes from now on (the real probe, only watched)."""
    probes: list[tuple[float, bool]] = []
    probe = engine.probe

    async def watched() -> bool:
        started = time.monotonic()
        ok = await probe()
        probes.append((started, ok))
        return ok

    monkeypatch.setattr(engine, "probe", watched)
    return probes


def test_upstream_down_at_start_then_recovers(
    upstream_settings: Settings, embedded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    interval = 1.0  # REMOTE_HEALTH_INTERVAL_S: while down, the front retries after 0.5 s, then after each interval
    settings = remote_settings(f"http://127.0.0.1:{port}/v1", health_interval_s=interval)
    engine = RemoteEngine(settings)
    probes = record_probes(engine, monkeypatch)
    front = start_live_server(settings, engine)
    try:
        wait_for(lambda: engine.state == "unavailable", 30, "front reports the upstream down")
        assert "unreachable" in engine.state_reason and f"127.0.0.1:{port}" in engine.state_reason
        body = {"text": "Halo", "max_new_tokens": 4, "temperature": 0}
        refused = post(front, "/api/v1/generate-text", body)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert "unreachable" in refused.json()["detail"]
        oai_refused = post(front, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert oai_refused.status_code == 503
        assert oai_refused.json()["error"]["type"] == "service_unavailable_error"
        assert front.server.started  # the service stays up, waiting for its upstream
        ready = httpx.get(f"{front.base_url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert ready.json()["status"] == "unavailable" and "unreachable" in ready.json()["reason"]
        metrics = httpx.get(f"{front.base_url}/metrics", headers=AUTH, timeout=10).text
        assert 'engine_state{state="unavailable"} 1.0' in metrics
        page = banner_markdown(engine, "en")  # the chat page says why, and keeps polling
        assert "cannot be reached" in page and "unreachable" in page
        assert "cannot be reached" in error_note(EngineNotReady(engine.state_reason), "en", engine)["content"]
        # Down for five probes: the back-off has reached its cap (one interval), where an uncapped one would be
        # waiting 8 s by now.
        wait_for(lambda: len(probes) >= 5, LIVENESS_S, "the front to keep probing its upstream")
        assert not any(ok for _, ok in probes)

        upstream = start_upstream(upstream_settings, embedded_model, port=port)  # serving from here on
        back = time.monotonic()
        try:
            wait_for(lambda: any(ok for _, ok in probes), LIVENESS_S, "front recovers")
            assert engine.ready
            # Recovered by the first probe after the upstream came back (no failed probe since) ...
            assert all(ok for started, ok in probes if started >= back), probes
            # ... which started within one back-off wait, at most the probe interval, of it (plus two intervals
            # for a loaded machine's event loop).
            recovered_at = next(started for started, ok in probes if ok)
            assert recovered_at - back < 3 * interval, (recovered_at - back, probes)
            answer = post(front, "/api/v1/generate-text", body)
            assert answer.status_code == 200 and answer.json()["generated_text"]
            assert httpx.get(f"{front.base_url}/ready", timeout=10).json()["status"] == "ready"
            assert engine.running == 0
        finally:
            stop_server(upstream)
    finally:
        front.server.should_exit = True


def test_upstream_dies_mid_stream_then_recovers(upstream_settings: Settings, embedded_model: LoadedModel) -> None:
    port = free_port()
    upstream = start_upstream(upstream_settings, embedded_model, port=port)
    settings = remote_settings(f"http://127.0.0.1:{port}/v1")
    engine = RemoteEngine(settings)
    front = start_live_server(settings, engine)
    try:
        wait_for(lambda: engine.ready, 30, "front ready")
        long = {"text": "Tulis esai panjang tentang sejarah Indonesia.", "max_new_tokens": 1400, "temperature": 0}

        # SSE on a spec route: deltas, then the upstream dies -> one `error` event with status 502.
        events: list[tuple[str, str]] = []
        with httpx.stream(
            "POST", f"{front.base_url}/api/v1/generate-text", headers=AUTH, json={**long, "stream": True}, timeout=60
        ) as response:
            assert response.status_code == 200
            for event, data in sse_events(response):
                events.append((event, data))
                if len(events) == 3:
                    threading.Thread(target=stop_server, args=(upstream,), kwargs={"abrupt": True}).start()
        kinds = [event for event, _ in events]
        assert kinds[:3] == ["delta"] * 3 and kinds[-1] == "error", kinds
        assert "complete" not in kinds
        error = json.loads(events[-1][1])
        assert error["status"] == 502 and "upstream" in error["detail"]

        # Then: the upstream is down -> 503 with Retry-After (at submit, or already from the health probe).
        wait_for(lambda: engine.state == "unavailable", 30, "front notices the upstream is gone")
        refused = post(front, "/api/v1/chat", {"text": "Halo", "max_new_tokens": 4})
        assert refused.status_code == 503 and "Retry-After" in refused.headers

        # The upstream comes back on the same address: the front recovers by itself.
        upstream = start_upstream(upstream_settings, embedded_model, port=port)
        wait_for(lambda: engine.ready, 30, "front recovers")
        answer = post(front, "/api/v1/chat", {"text": "Halo", "max_new_tokens": 4, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["output_length"] > 0
    finally:
        front.server.should_exit = True
        upstream.server.should_exit = True


# --- faults a real upstream cannot be made to produce on demand: a small fake upstream ------------------------


def fake_upstream_app(requests_seen: list[dict]) -> FastAPI:
    """An OpenAI-shaped server whose behaviour is chosen by the last user message. `requests_seen` gets each
    completion request's body, with the `X-Request-Id` header it came with under "x-request-id"."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        requests_seen.append({**body, "x-request-id": request.headers.get("x-request-id")})
        last = body["messages"][-1]["content"]
        if any(m["role"] == "system" for m in body["messages"]):
            return JSONResponse({"error": {"message": "System role not supported", "type": "x"}}, 400)
        if "boom" in last:
            return JSONResponse({"error": {"message": "CUDA error: device-side assert", "type": "x"}}, 500)
        if "busy" in last:
            return JSONResponse({"error": "Model is overloaded", "error_type": "overloaded"}, 429, {"Retry-After": "3"})

        def chunk(content: str | None, finish: str | None = None) -> str:
            return json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "fake-model",
                    "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
                }
            )

        async def events():
            yield chunk("Halo")
            yield chunk(" dunia")
            if "cut" in last:
                return  # the stream ends with no finish reason and no [DONE]
            yield chunk(None, "length")
            usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
            yield json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": "fake-model",
                    "choices": [],
                    "usage": usage,
                }
            )
            yield "[DONE]"

        return EventSourceResponse(events(), sep="\n")

    return app


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[tuple[str, list[dict]]]:
    seen: list[dict] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake_upstream_app(seen), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}/v1"
    wait_for(lambda: server.started, 30, "fake upstream")
    yield url, seen
    server.should_exit = True


def run_engine(url: str, scenario: Callable[[RemoteEngine], object], **overrides: object) -> object:
    async def run() -> object:
        engine = RemoteEngine(remote_settings(url, **overrides))
        await engine.start()
        try:
            return await scenario(engine)  # type: ignore[misc]
        finally:
            await engine.aclose()

    return asyncio.run(run())


def request_of(text: str, system: str | None = None, max_new_tokens: int = 5):
    from inference import GenerationRequest

    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    return GenerationRequest(messages=messages, max_new_tokens=max_new_tokens)


def test_totals_and_finish_reason_come_from_the_upstream(fake_upstream: tuple[str, list[dict]]) -> None:
    url, seen = fake_upstream

    async def scenario(engine: RemoteEngine):
        return await engine.generate(request_of("hello"))

    result = run_engine(url, scenario)
    assert result.text == "Halo dunia" and result.finish_reason == "length"
    assert (result.input_length, result.output_length) == (11, 2)
    assert seen[-1]["stream_options"] == {"include_usage": True} and seen[-1]["model"] == "fake-model"


def test_system_role_refused_is_folded_once(fake_upstream: tuple[str, list[dict]]) -> None:
    url, seen = fake_upstream

    async def scenario(engine: RemoteEngine):
        first = await engine.generate(request_of("hello", system="Jawab singkat."))
        second = await engine.generate(request_of("again", system="Jawab singkat."))
        return first, second, engine.fold_system

    count = len(seen)
    first, second, folded = run_engine(url, scenario)
    assert first.text == second.text == "Halo dunia" and folded
    sent = seen[count:]
    assert len(sent) == 3  # refused once, then folded for this and every later request
    assert sent[1]["messages"] == [{"role": "user", "content": "Jawab singkat.\n\nhello"}]


def test_upstream_5xx_busy_and_cut_streams(fake_upstream: tuple[str, list[dict]]) -> None:
    url, _ = fake_upstream
    from inference import EngineBusy

    async def scenario(engine: RemoteEngine):
        outcomes = {}
        for text in ("boom", "busy", "cut"):
            try:
                await engine.generate(request_of(text))
            except Exception as error:
                outcomes[text] = error
        return outcomes

    outcomes = run_engine(url, scenario, remote_system_role="native")
    assert isinstance(outcomes["boom"], UpstreamError) and "HTTP 500" in str(outcomes["boom"])
    assert "CUDA error" in str(outcomes["boom"])
    assert isinstance(outcomes["busy"], EngineBusy) and outcomes["busy"].retry_after_s == 3
    assert "overloaded" in str(outcomes["busy"])
    assert isinstance(outcomes["cut"], UpstreamError) and "finish reason" in str(outcomes["cut"])


def test_5xx_is_a_502_json_error_on_both_apis(fake_upstream: tuple[str, list[dict]]) -> None:
    url, _ = fake_upstream
    settings = remote_settings(url, remote_system_role="fold")
    engine = RemoteEngine(settings)
    front = start_live_server(settings, engine)
    try:
        wait_for(lambda: engine.ready, 30, "front ready")
        spec = post(front, "/api/v1/generate-text", {"text": "boom"})
        assert spec.status_code == 502 and spec.json()["detail"].startswith("upstream error:")
        oai = post(front, "/v1/chat/completions", {"messages": [{"role": "user", "content": "boom"}]})
        assert oai.status_code == 502 and oai.json()["error"]["type"] == "upstream_error"
        # A stream cut after its first deltas: the SSE error event, in each API's shape.
        deltas, others, _ = spec_stream_events(front, "/api/v1/generate-text", {"text": "cut", "stream": True})
        assert deltas == ["Halo", " dunia"] and others[-1][0] == "error"
        assert json.loads(others[-1][1])["status"] == 502
        with httpx.stream(
            "POST",
            f"{front.base_url}/v1/chat/completions",
            headers=AUTH,
            json={"messages": [{"role": "user", "content": "cut"}], "stream": True},
            timeout=30,
        ) as response:
            payloads = [data for _, data in sse_events(response)]
        assert json.loads(payloads[-1])["error"]["type"] == "upstream_error"
        assert "[DONE]" not in payloads
    finally:
        front.server.should_exit = True


def test_the_request_id_is_forwarded_to_the_upstream(fake_upstream: tuple[str, list[dict]]) -> None:
    """Both API families hand the client's `X-Request-ID` to the upstream, so one id finds a request in both logs."""
    url, seen = fake_upstream
    settings = remote_settings(url)
    engine = RemoteEngine(settings)
    front = start_live_server(settings, engine)
    try:
        wait_for(lambda: engine.ready, 30, "front ready")
        for path, body in (
            ("/api/v1/generate-text", {"text": "hello", "max_new_tokens": 5}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}),
        ):
            request_id = f"forwarded-{path.strip('/').replace('/', '-')}"
            response = httpx.post(
                f"{front.base_url}{path}", headers={**AUTH, "X-Request-ID": request_id}, json=body, timeout=30
            )
            assert response.status_code == 200, response.text
            assert seen[-1]["x-request-id"] == request_id, path
    finally:
        front.server.should_exit = True


# --- remote mode is small: no torch, no transformers ----------------------------------------------------------

NO_TORCH_SCRIPT = """
import sys
from inference import build_engine
from webapp.settings import Settings
from webapp.server import create_app
settings = Settings(engine="remote", remote_url="http://127.0.0.1:9/v1", _env_file=None)
engine = build_engine(settings)
app = create_app(settings, engine, ["k"])
heavy = sorted(m for m in ("torch", "transformers", "tokenizers", "safetensors", "accelerate") if m in sys.modules)
print("HEAVY", heavy, type(engine).__name__)
"""


def test_remote_mode_imports_no_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY [] RemoteEngine" in result.stdout, result.stdout


# Blocks the packages the front's Docker image leaves out (deploy/requirements-front.exclude), then runs app.py.
BLOCKED_APP = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in the front image")
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["app.py"]
runpy.run_path("app.py", run_name="__main__")
"""


def front_image_excludes() -> list[str]:
    lines = (ROOT / "deploy" / "requirements-front.exclude").read_text().splitlines()
    return [line.split("=")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def test_app_starts_in_remote_mode_without_model_packages(upstream: LiveServer) -> None:
    import psutil

    blocked = {name.replace("-", "_") for name in front_image_excludes()}
    assert {"torch", "transformers"} <= blocked
    port = free_port()
    env = {
        **os.environ,
        "ENGINE": "remote",
        "REMOTE_URL": f"{upstream.base_url}/v1",
        "REMOTE_API_KEY": API_KEY,
        "API_KEYS": API_KEY,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "warning",
    }
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_APP, ",".join(sorted(blocked))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=AUTH, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "remote-mode app ready")
        ready_s = time.monotonic() - started
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/chat",
            headers=AUTH,
            json={"text": "Halo", "max_new_tokens": 3, "temperature": 0},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        rss_mib = psutil.Process(process.pid).memory_info().rss / 2**20
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "libtorch" not in maps
        print(f"\nremote-mode app: ready in {ready_s:.1f} s, RSS {rss_mib:.0f} MiB")
        assert rss_mib < 600, rss_mib
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_remote_overhead_bench_runs(tmp_path: Path) -> None:
    """bench/remote_overhead.py end to end on a tiny load: synthetic upstream, remote-mode front, the summary."""
    out = tmp_path / "bench.json"
    argv = ["--upstream", "synthetic", "-c", "2", "-n", "2", "--max-tokens", "3", "--rounds", "1"]
    argv += ["--synthetic-interval-ms", "1", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, "bench/remote_overhead.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "throughput through/direct" in result.stdout and "added TTFT p50" in result.stdout
    summary = json.loads(out.read_text())["results"][0]
    assert summary["concurrency"] == 2 and summary["direct_tok_s"] > 0 and summary["through_tok_s"] > 0
    assert all(r["direct"]["errors"] == r["through"]["errors"] == 0 for r in summary["rounds"])
