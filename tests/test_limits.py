"""Request limits, each refused with a clear 4xx, and Unicode that never breaks tokenization or JSON/SSE encoding."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from inference.model.loading import LoadedModel
from tests.helpers import (
    API_KEY,
    AUTH,
    LiveServer,
    both_engines,
    engine_for,
    spec_stream,
    sse_events,
    start_live_server,
)
from webapp.server import create_app
from webapp.settings import Settings

pytestmark = both_engines  # the engine users get (batched), and the sequential one: the same behaviour

LIMITS = {"max_body_bytes": 4096, "max_history_messages": 3, "max_total_chars": 600, "max_new_tokens_cap": 8}


@pytest.fixture(scope="module")
def limited_settings() -> Settings:
    return Settings(model_id="embedded", _env_file=None, **LIMITS)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def limited(limited_settings: Settings, embedded_model: LoadedModel, engine_kind: str) -> Iterator[LiveServer]:
    """A real server (UI mounted too) with small limits, for over-the-wire body-size tests."""
    live = start_live_server(limited_settings, engine_for(limited_settings, embedded_model, engine_kind))
    yield live
    live.server.should_exit = True
    live.engine.close()


@pytest.fixture(scope="module")
def limited_client(limited: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.base_url, timeout=600) as client:
        yield client


def detail(response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if "error" in body else body["detail"]


# --- Body size (413) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/generate-text", "/api/v1/chat", "/v1/chat/completions", "/health"])
def test_declared_body_above_the_limit_is_413_before_reading_it(limited_client: httpx.Client, path: str) -> None:
    body = json.dumps({"text": "x" * 5000}).encode()
    response = limited_client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert "4096 bytes (MAX_BODY_BYTES)" in detail(response)
    if path.startswith("/v1/"):
        assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/api/v1/generate-text", "/v1/chat/completions"])
def test_chunked_body_without_content_length_is_counted_and_refused(limited_client: httpx.Client, path: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(64):  # 64 KiB offered, far past the 4 KiB limit
            yield b"y" * 1024
        yield b'"}'

    response = limited_client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "MAX_BODY_BYTES" in detail(response)


def test_the_chat_page_is_behind_the_same_body_limit(limited_client: httpx.Client) -> None:
    response = limited_client.post(
        "/gradio_api/queue/join", headers={"Content-Type": "application/json"}, content=b"[" + b"0," * 4000 + b"0]"
    )
    assert response.status_code == 413


def test_body_just_under_the_limit_is_served(limited_client: httpx.Client) -> None:
    body = {"text": "Halo " + "a" * 100, "max_new_tokens": 2, "stop": ["zzzz"], "temperature": 0}
    padded = json.dumps(body) + " " * (4096 - len(json.dumps(body)))  # exactly 4096 bytes
    assert len(padded.encode()) == 4096
    response = limited_client.post(
        "/api/v1/generate-text", headers={**AUTH, "Content-Type": "application/json"}, content=padded
    )
    assert response.status_code == 200, response.text


# --- History, characters, max_new_tokens, context (400) ------------------------------------------------


@pytest.fixture(scope="module")
def small(limited_settings: Settings, engine) -> TestClient:
    return TestClient(create_app(limited_settings, engine, [API_KEY], with_ui=False))


def turns(count: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"pesan {i}"} for i in range(count)]


def test_history_above_max_history_messages_is_400(small: TestClient) -> None:
    ok = small.post("/api/v1/chat", headers=AUTH, json={"text": "Halo", "conversation_history": turns(2)[:2]})
    assert ok.status_code == 200, ok.text
    response = small.post("/api/v1/chat", headers=AUTH, json={"text": "Halo", "conversation_history": turns(4)})
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "conversation_history: 4 earlier messages, above the limit of 3 (MAX_HISTORY_MESSAGES)"
    )
    messages = [*turns(4), {"role": "user", "content": "Halo"}]
    response = small.post("/v1/chat/completions", headers=AUTH, json={"messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "MAX_HISTORY_MESSAGES" in error["message"] and error["param"] == "messages"


def test_total_characters_above_max_total_chars_is_400(small: TestClient) -> None:
    # Each part is under the limit; together they are over it.
    body = {
        "text": "a" * 250,
        "system_message": "b" * 250,
        "conversation_history": [{"role": "user", "content": "c" * 150}],
    }
    response = small.post("/api/v1/generate-text", headers=AUTH, json=body)
    assert response.status_code == 400
    assert "650 characters" in response.json()["detail"] and "MAX_TOTAL_CHARS" in response.json()["detail"]
    messages = [{"role": "system", "content": "b" * 400}, {"role": "user", "content": "a" * 250}]
    response = small.post("/v1/chat/completions", headers=AUTH, json={"messages": messages})
    assert response.status_code == 400 and "MAX_TOTAL_CHARS" in response.json()["error"]["message"]


def test_the_automatic_chat_system_message_does_not_count_against_the_client(small: TestClient) -> None:
    assert len(Settings(_env_file=None).chat_system_message) > 100  # type: ignore[call-arg]
    response = small.post("/api/v1/chat", headers=AUTH, json={"text": "a" * 590, "max_new_tokens": 1})
    assert response.status_code == 200, response.text


def test_max_new_tokens_cap_and_the_default_under_a_low_cap(small: TestClient) -> None:
    response = small.post("/api/v1/generate-text", headers=AUTH, json={"text": "Halo", "max_new_tokens": 9})
    assert response.status_code == 400 and "at most 8 (MAX_NEW_TOKENS_CAP)" in response.json()["detail"]
    response = small.post("/v1/chat/completions", headers=AUTH, json={"messages": turns(1), "max_tokens": 9})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    # Omitted, the default (256) is lowered to the cap instead of refused.
    body = {"text": "Tulis cerita panjang.", "temperature": 0}
    response = small.post("/api/v1/generate-text", headers=AUTH, json=body)
    assert response.status_code == 200 and 0 < response.json()["output_length"] <= 8
    response = small.post("/v1/chat/completions", headers=AUTH, json={"messages": turns(1), "temperature": 0})
    assert response.status_code == 200 and 0 < response.json()["usage"]["completion_tokens"] <= 8


def test_the_openapi_schema_documents_the_configured_limits(small: TestClient) -> None:
    schema = small.get("/openapi.json").json()
    props = schema["components"]["schemas"]["GenerateTextRequest"]["properties"]
    assert props["max_new_tokens"]["maximum"] == 8
    assert props["text"]["maxLength"] == 600
    assert props["conversation_history"]["anyOf"][0]["maxItems"] == 3
    oai = schema["components"]["schemas"]["OpenAIChatCompletionRequest"]["properties"]
    assert oai["messages"]["maxItems"] == 4
    assert oai["max_tokens"]["anyOf"][0]["maximum"] == 8
    for path in ("/api/v1/generate-text", "/api/v1/chat", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "413", "500", "503"} <= set(responses) and "422" not in responses


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_400_on_the_openai_route(client: TestClient, stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": "kata " * 9000}], "max_tokens": 100, "stream": stream}
    response = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert response.status_code == 400
    assert "8192" in response.json()["error"]["message"]


# --- Unicode on JSON and SSE routes -------------------------------------------------------------------------

UNICODE_TEXTS = {
    "emoji": "Halo 👋🏽 keluarga 👨‍👩‍👧‍👦 dan bendera 🇮🇩!",
    "javanese": "ꦱꦸꦒꦺꦁ ꦫꦮᦸꦃ ꦲꦶꦁ ꦗꦮ — sugeng rawuh",
    "rtl": "مرحبا بالعالم \u202eעברית\u202c and \u200fmixed\u200e text",
    "nul_and_controls": "a\x00b\x01c\x7f\u0085d\u2028e\u2029f\ufeffg\ufffe",
    "combining": "e\u0301\u0301\u0301 Z\u0335\u0321\u0334a\u0336\u0322l\u0337go",
    "astral": "𝕳𝖆𝖑𝖔 𓀀 \U0010ffff \U000e0001",
}


@pytest.mark.parametrize("name", list(UNICODE_TEXTS))
def test_unicode_is_served_and_echoed_exactly_on_json_and_sse_routes(client: TestClient, name: str) -> None:
    text = UNICODE_TEXTS[name]
    history = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    body = {"text": text, "system_message": text, "conversation_history": history, "max_new_tokens": 3}
    response = client.post("/api/v1/generate-text", headers=AUTH, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["full_conversation"][:4] == [
        {"role": "system", "content": text},
        *history,
        {
            "role": "user",
            "content": text,
        },
    ]
    deltas, final, _ = spec_stream(client, "/api/v1/chat", {**body, "stream": True})
    assert "".join(deltas) == final["generated_text"] and final["full_conversation"][3]["content"] == text

    messages = [{"role": "system", "content": text}, *history, {"role": "user", "content": text}]
    response = client.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "max_tokens": 3})
    assert response.status_code == 200, response.text
    with client.stream(
        "POST", "/v1/chat/completions", headers=AUTH, json={"messages": messages, "max_tokens": 3, "stream": True}
    ) as streamed:
        assert streamed.status_code == 200
        datas = [data for _, data in sse_events(streamed)]
    assert datas[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in datas[:-1])


LONE_SURROGATE_BODIES = {
    "text": ('{"text": "a\\ud800b", "max_new_tokens": 2%s}', "text"),
    "low_surrogate_in_history": (
        '{"text": "hi", "conversation_history": [{"role": "user", "content": "\\udfff"}]%s}',
        "conversation_history.0.content",
    ),
    "system_message": ('{"text": "hi", "system_message": "x\\udbff"%s}', "system_message"),
    "stop": ('{"text": "hi", "stop": ["\\ud800"]%s}', "stop"),
    "reversed_pair": ('{"text": "\\ude00\\ud83d"%s}', "text"),
}


@pytest.mark.parametrize("name", list(LONE_SURROGATE_BODIES))
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogates_are_a_clear_400_never_a_crash(client: TestClient, name: str, stream: bool) -> None:
    template, field = LONE_SURROGATE_BODIES[name]
    raw = template % (', "stream": true' if stream else "")
    response = client.post(
        "/api/v1/generate-text", headers={**AUTH, "Content-Type": "application/json"}, content=raw.encode()
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["detail"]
    assert message.startswith(field) and "surrogate" in message


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogates_on_the_openai_route(client: TestClient, stream: bool) -> None:
    for content in ('"a\\ud800"', '[{"type": "text", "text": "\\udc00"}]'):
        raw = '{"messages": [{"role": "user", "content": ' + content + '}], "stream": ' + json.dumps(stream) + "}"
        response = client.post(
            "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=raw.encode()
        )
        assert response.status_code == 400, response.text
        assert "surrogate" in response.json()["error"]["message"]


def test_a_surrogate_in_a_field_name_still_gets_a_valid_json_error(client: TestClient) -> None:
    raw = '{"text": "hi", "\\ud800\\u0000evil": 1}'
    response = client.post(
        "/api/v1/generate-text", headers={**AUTH, "Content-Type": "application/json"}, content=raw.encode()
    )
    assert response.status_code == 400
    assert response.json()["detail"]


def test_a_correct_surrogate_pair_is_one_emoji(client: TestClient) -> None:
    raw = '{"text": "\\ud83d\\ude00", "max_new_tokens": 2}'
    response = client.post(
        "/api/v1/generate-text", headers={**AUTH, "Content-Type": "application/json"}, content=raw.encode()
    )
    assert response.status_code == 200
    assert response.json()["full_conversation"][0]["content"] == "😀"
