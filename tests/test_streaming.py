"""Streaming over the wire: SSE on the documented endpoints, the OpenAI-compatible API with the official
client, stop sequences on all generation routes, and cancellation when a client goes away."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import AUTH, LiveServer, both_engines, spec_stream, sse_events

pytestmark = both_engines  # the engine users get (batched), and the sequential one: the same behaviour


@pytest.mark.parametrize("path", ["/api/v1/generate-text", "/api/v1/chat"])
def test_spec_endpoints_stream_deltas_then_the_documented_object(live_server: LiveServer, path: str) -> None:
    body = {"text": "Ceritakne babagan sejarah Jawa", "max_new_tokens": 12, "temperature": 0, "stream": True}
    deltas, final, response = spec_stream(live_server, path, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert len(deltas) >= 2
    assert set(final) == {"generated_text", "full_conversation", "model", "input_length", "output_length"}
    assert "".join(deltas) == final["generated_text"]
    assert 0 < final["output_length"] <= 12
    plain = httpx.post(
        f"{live_server.base_url}{path}", headers=AUTH, json={**body, "stream": False}, timeout=600
    ).json()
    assert plain["generated_text"] == final["generated_text"]


def test_streaming_request_errors_are_plain_json_before_the_stream(live_server: LiveServer) -> None:
    response = httpx.post(
        f"{live_server.base_url}/api/v1/generate-text",
        headers=AUTH,
        json={"text": "", "stream": True},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"


def test_openai_client_chats(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="sahabat-ai",
        messages=[
            {"role": "system", "content": "Jawab singkat."},
            {"role": "user", "content": "Apa ibu kota Indonesia?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert completion.object == "chat.completion"
    assert completion.model == "SmolLM2-135M-Instruct-Q4_1"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_openai_client_streams_with_usage(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Sebutkan tiga pulau di Indonesia."}]
    whole = oai.chat.completions.create(model="sahabat-ai", messages=messages, max_tokens=10, temperature=0)
    stream = oai.chat.completions.create(
        model="sahabat-ai",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_models(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct-Q4_1", "sahabat-ai"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),  # the legacy field; tools are supported
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_openai_unsupported_or_invalid_fields_are_400(oai: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model="sahabat-ai", messages=[{"role": "user", "content": "hi"}], **extra)
    error = raised.value.body
    assert isinstance(error, dict) and param in error["message"]
    assert error["type"] == "invalid_request_error"


def test_openai_tool_role_is_400_in_openai_error_shape(live_server: LiveServer) -> None:
    response = httpx.post(
        f"{live_server.base_url}/v1/chat/completions",
        headers=AUTH,
        json={"model": "sahabat-ai", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
        timeout=10,
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_wrong_key(live_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert raised.value.body["type"] == "authentication_error"


def test_stop_sequences_on_every_route(live_server: LiveServer, oai: openai.OpenAI) -> None:
    prompt = "Sebutkan nama-nama hari dalam seminggu."
    base = {"text": prompt, "max_new_tokens": 24, "temperature": 0}
    full = httpx.post(f"{live_server.base_url}/api/v1/generate-text", headers=AUTH, json=base, timeout=600).json()
    text = full["generated_text"]
    assert len(text) > 12
    stop = text[8:11]
    expected = text[: text.find(stop)]
    cut = httpx.post(
        f"{live_server.base_url}/api/v1/generate-text", headers=AUTH, json={**base, "stop": [stop]}, timeout=600
    ).json()
    assert cut["generated_text"] == expected
    deltas, final, _ = spec_stream(live_server, "/api/v1/generate-text", {**base, "stop": [stop], "stream": True})
    assert "".join(deltas) == final["generated_text"] == expected
    completion = oai.chat.completions.create(
        model="sahabat-ai", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0, stop=stop
    )
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"


def test_disconnect_cancels_generation_and_frees_the_model(live_server: LiveServer) -> None:
    engine = live_server.engine
    before = engine.generated_tokens_total
    body = {"text": "Tulis esai panjang tentang sejarah Indonesia.", "max_new_tokens": 1500, "temperature": 0}
    with httpx.stream(
        "POST", f"{live_server.base_url}/api/v1/generate-text", headers=AUTH, json={**body, "stream": True}, timeout=600
    ) as response:
        deltas = 0
        for event, _ in sse_events(response):
            deltas += event == "delta"
            if deltas == 3:
                break  # leaving the block closes the connection mid-stream
    after = httpx.post(
        f"{live_server.base_url}/api/v1/generate-text",
        headers=AUTH,
        json={"text": "Halo", "max_new_tokens": 4, "temperature": 0},
        timeout=600,  # a hang guard: with the model still busy for the client that left, this waits for it
    )
    assert after.status_code == 200
    assert engine.running == 0
    cancelled_tokens = engine.generated_tokens_total - before - after.json()["output_length"] - 1
    assert cancelled_tokens < 150, cancelled_tokens  # far fewer than the 1500 asked for


def test_openai_stream_disconnect_cancels(live_server: LiveServer, oai: openai.OpenAI) -> None:
    engine = live_server.engine
    before = engine.generated_tokens_total
    stream = oai.chat.completions.create(
        model="sahabat-ai",
        messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=1500,
        stream=True,
    )
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    stream.close()
    completion = oai.chat.completions.create(
        model="sahabat-ai", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert completion.choices[0].message.content
    assert engine.running == 0
    assert engine.generated_tokens_total - before < 150
