"""Anthropic's Messages API (webapp/api/anthropic/): POST /v1/messages and /v1/messages/count_tokens through the
official `anthropic` SDK, unmodified, on both local engines (ENGINE=remote: tests/test_messages_remote.py).

Every reply is bounded by max_tokens and greedy (temperature 0), so each assertion holds on any machine."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.helpers import API_KEY, ForcedFault, LiveServer, both_engines, sse_events

pytestmark = both_engines

MODEL = "sahabat-ai"
GREEDY = {"temperature": 0}  # an extension field here: SDK 2.x no longer has a temperature argument
ASK = [{"role": "user", "content": "Name three colours."}]
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
needs_grammar = pytest.mark.needs_grammar


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def post(live: LiveServer, path: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{live.base_url}{path}", json=body, headers={"x-api-key": API_KEY, **headers}, timeout=600)


def assert_anthropic_error(response: httpx.Response, status: int, kind: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    for word in words:
        assert word in body["error"]["message"], body


# --- create -----------------------------------------------------------------------------------------------------


def test_create_returns_an_anthropic_message(anthropic_client: anthropic.Anthropic, live_server: LiveServer) -> None:
    message = anthropic_client.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=ASK)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == live_server.engine.info.model_id
    assert [block.type for block in message.content] == ["text"] and text_of(message).strip()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12


def test_max_tokens_ends_the_reply_with_stop_reason_max_tokens(anthropic_client: anthropic.Anthropic) -> None:
    message = anthropic_client.messages.create(
        model=MODEL, max_tokens=3, extra_body=GREEDY, messages=[{"role": "user", "content": "Write a long story."}]
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_the_system_prompt_reaches_the_model(anthropic_client: anthropic.Anthropic) -> None:
    plain = anthropic_client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=ASK)
    # Longer than the default system prompt SmolLM2's template adds when a conversation has none.
    system = [{"type": "text", "text": "You are a poet who answers in rhymes about the sea. " * 6}]
    told = anthropic_client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, system=system, messages=ASK)
    assert told.usage.input_tokens >= plain.usage.input_tokens + 30  # the system text is in the prompt


def test_stop_sequences_end_the_reply_and_name_the_sequence(anthropic_client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    free = text_of(anthropic_client.messages.create(model=MODEL, max_tokens=30, extra_body=GREEDY, messages=messages))
    stop = free.strip()[len(free.strip()) // 2 :][:2]  # two characters from the middle of the greedy reply
    assert stop.strip(), free
    stopped = anthropic_client.messages.create(
        model=MODEL, max_tokens=30, extra_body=GREEDY, messages=messages, stop_sequences=["zzzq", stop]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stop not in text_of(stopped) and free.startswith(text_of(stopped))


# --- streaming --------------------------------------------------------------------------------------------------


def test_messages_stream_text_equals_the_final_message(anthropic_client: anthropic.Anthropic) -> None:
    with anthropic_client.messages.stream(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ASK) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(final)
    created = anthropic_client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=ASK)
    assert text_of(final) == text_of(created) and final.stop_reason == created.stop_reason
    assert final.usage.input_tokens == created.usage.input_tokens  # from message_delta
    assert final.usage.output_tokens == created.usage.output_tokens


def test_create_stream_sends_anthropics_events_in_order(anthropic_client: anthropic.Anthropic) -> None:
    events = list(
        anthropic_client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, messages=ASK, stream=True)
    )
    kinds = [event.type for event in events]
    deltas = [i for i, kind in enumerate(kinds) if kind == "content_block_delta"]
    assert kinds[:2] == ["message_start", "content_block_start"] and deltas
    assert kinds[deltas[-1] + 1 :] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2 : deltas[-1] + 1]) <= {"ping", "content_block_delta"}
    assert events[-2].delta.stop_reason in ("end_turn", "max_tokens") and events[-2].usage.output_tokens > 0


def test_the_raw_stream_names_each_event_and_pings(live_server: LiveServer) -> None:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": ASK, "stream": True}
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{live_server.base_url}/v1/messages", json=body, headers=headers, timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        pairs = list(sse_events(r))
    assert all(json.loads(data)["type"] == event for event, data in pairs)
    assert [event for event, _ in pairs][:3] == ["message_start", "content_block_start", "ping"]


def test_an_engine_error_mid_stream_is_an_anthropic_error_event(live_server: LiveServer) -> None:
    marker = "zebra-fault-7"
    body = {"model": MODEL, "max_tokens": 20, "temperature": 0, "stream": True}
    body["messages"] = [{"role": "user", "content": f"Tell me about {marker}."}]
    with (
        ForcedFault(live_server.engine, marker, after=2),
        httpx.stream("POST", f"{live_server.base_url}/v1/messages", json=body, headers={"x-api-key": API_KEY}) as r,
    ):
        pairs = list(sse_events(r))
    assert pairs[-1][0] == "error", pairs
    error = json.loads(pairs[-1][1])
    assert (
        error["type"] == "error"
        and error["error"]["type"] == "api_error"
        and "generation failed" in error["error"]["message"]
    )
    assert "message_stop" not in [event for event, _ in pairs]


# --- tools ------------------------------------------------------------------------------------------------------


@needs_grammar
def test_a_named_tool_choice_is_exactly_one_valid_tool_use(anthropic_client: anthropic.Anthropic) -> None:
    message = anthropic_client.messages.create(
        model=MODEL,
        max_tokens=40,
        extra_body=GREEDY,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Jakarta?"}],
    )
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert [block.type for block in message.content] == ["tool_use"]
    call = message.content[0]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])


@needs_grammar
def test_a_streamed_tool_use_arrives_as_input_json_deltas(anthropic_client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What is the weather in Jakarta?"}]
    kwargs = {"model": MODEL, "max_tokens": 40, "extra_body": GREEDY, "tools": [WEATHER], "messages": question}
    with anthropic_client.messages.stream(tool_choice={"type": "any"}, **kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and "text" not in kinds
    assert final.stop_reason == "tool_use" and [block.type for block in final.content] == ["tool_use"]
    jsonschema.validate(final.content[0].input, WEATHER["input_schema"])


@needs_grammar
def test_a_tool_loop_ends_in_a_text_answer(anthropic_client: anthropic.Anthropic) -> None:
    question = {"role": "user", "content": "What is the weather in Jakarta?"}
    first = anthropic_client.messages.create(
        model=MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER], tool_choice={"type": "any"}, messages=[question]
    )
    call = first.content[0]
    assert call.type == "tool_use"
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "31 degrees celsius, sunny, humid"}
    turns = [question, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    answer = anthropic_client.messages.create(
        model=MODEL, max_tokens=24, extra_body=GREEDY, tools=[WEATHER], tool_choice={"type": "none"}, messages=turns
    )
    assert [block.type for block in answer.content] == ["text"] and text_of(answer).strip()
    assert answer.stop_reason in ("end_turn", "max_tokens")
    before = anthropic_client.messages.count_tokens(
        model=MODEL, tools=[WEATHER], tool_choice={"type": "none"}, messages=[question]
    )
    assert answer.usage.input_tokens > before.input_tokens + 15  # the call and its result are in the prompt


def test_a_tool_result_must_answer_the_turn_before(live_server: LiveServer) -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "42"}
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [result]}]}
    assert_anthropic_error(
        post(live_server, "/v1/messages", body), 400, "invalid_request_error", "messages.0.content.0.tool_use_id"
    )


# --- count_tokens -----------------------------------------------------------------------------------------------


def test_count_tokens_matches_the_prompt_the_model_reads(anthropic_client: anthropic.Anthropic) -> None:
    count = anthropic_client.messages.count_tokens(model=MODEL, messages=ASK).input_tokens
    longer = [{"role": "user", "content": "Name three colours, and for each a fruit of that colour, please."}]
    assert 0 < count < anthropic_client.messages.count_tokens(model=MODEL, messages=longer).input_tokens
    with_tools = anthropic_client.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER]).input_tokens
    assert with_tools > count + 20  # the tools' system text
    message = anthropic_client.messages.create(
        model=MODEL, max_tokens=4, extra_body=GREEDY, messages=ASK, tools=[WEATHER]
    )
    assert message.usage.input_tokens == with_tools


# --- auth and errors --------------------------------------------------------------------------------------------


def x_api_key_client(live: LiveServer, key: str) -> anthropic.Anthropic:
    """The SDK sending its key as `x-api-key` only, as Claude Code and the 0.x SDKs do (2.x sends a Bearer)."""
    headers = {"Authorization": anthropic.Omit(), "X-Api-Key": key}
    return anthropic.Anthropic(base_url=live.base_url, api_key="unused", default_headers=headers, max_retries=0)


def test_a_wrong_x_api_key_is_an_authentication_error(live_server: LiveServer) -> None:
    assert x_api_key_client(live_server, API_KEY).messages.count_tokens(model=MODEL, messages=ASK).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as caught:
        x_api_key_client(live_server, "wrong-key-123").messages.create(model=MODEL, max_tokens=4, messages=ASK)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }
    response = httpx.post(f"{live_server.base_url}/v1/messages", json={}, timeout=60)
    assert_anthropic_error(response, 401, "authentication_error", "x-api-key")


def test_x_api_key_opens_every_route(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.base_url}/v1/models", headers={"x-api-key": API_KEY}).status_code == 200
    assert httpx.get(f"{live_server.base_url}/v1/models", headers={"x-api-key": "nope"}).status_code == 401


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_tokens": None}, ["max_tokens", "required"]),
        ({"max_tokens": 10**6}, ["max_tokens", "MAX_NEW_TOKENS_CAP"]),
        ({"temperature": 1.5}, ["temperature"]),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, ["thinking", "not supported"]),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, ["tools.0", "server tools"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            ["messages.0.content.0", "image"],
        ),
        ({"tool_choice": {"type": "tool"}}, ["tool_choice", "name"]),
        ({"top_logprobs": 2}, ["top_logprobs"]),
    ],
)
def test_invalid_requests_are_400s_naming_the_field(live_server: LiveServer, change: dict, words: list[str]) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": ASK, **change}
    body = {key: value for key, value in body.items() if value is not None}
    assert_anthropic_error(post(live_server, "/v1/messages", body), 400, "invalid_request_error", *words)


def test_the_sdk_raises_bad_request_for_an_image(anthropic_client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        anthropic_client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}])


def test_an_unknown_model_is_not_found(anthropic_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        anthropic_client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=ASK)
    assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client.messages.count_tokens(model="claude-sonnet-4-5", messages=ASK)


def test_other_errors_under_v1_messages_take_anthropics_envelope(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.base_url}/v1/messages", headers={"x-api-key": API_KEY})
    assert_anthropic_error(response, 405, "invalid_request_error", "POST")
    assert_anthropic_error(post(live_server, "/v1/messages/nowhere", {}), 404, "not_found_error")
    big = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    assert_anthropic_error(post(live_server, "/v1/messages", big), 413, "request_too_large", "MAX_BODY_BYTES")
    assert_anthropic_error(post(live_server, "/v1/messages", [1]), 400, "invalid_request_error")
    assert "error" in post(live_server, "/v1/chat/completions", {"messages": []}).json()  # OpenAI's shape there
