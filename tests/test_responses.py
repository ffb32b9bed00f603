"""POST /v1/responses (webapp/api/responses/) with the official openai SDK, unmodified: text, streaming events,
instructions, max_output_tokens, text.format, function calls and their loop, refused fields, and the remote engine.

Every test runs on both local engines (`both_engines`); the last two run through ENGINE=remote in front of the
module's live server. Bounded by tokens (small max_output_tokens, temperature 0), never by time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from inference.engines.remote import RemoteEngine
from tests.helpers import (
    ADD_FUNCTION,
    API_KEY,
    AUTH,
    ForcedFault,
    LiveServer,
    both_engines,
    openai_client,
    start_live_server,
)
from webapp.settings import Settings

pytestmark = both_engines
needs_grammar = pytest.mark.needs_grammar

MODEL = "sahabat-ai"
FINISHES = "What is 2+2?"  # the embedded model's greedy reply ends (finish "stop") well within 40 tokens
ADD = {"type": "function", **ADD_FUNCTION, "strict": True}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def test_text_response(oai: openai.OpenAI) -> None:
    reply = oai.responses.create(model=MODEL, input=FINISHES, max_output_tokens=40, temperature=0)
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.status == "completed"
    assert reply.error is None and reply.incomplete_details is None
    assert reply.model == "SmolLM2-135M-Instruct-Q4_1"
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert reply.output_text.strip() and reply.output_text == message.content[0].text
    usage = reply.usage
    assert usage is not None and usage.input_tokens > 0 and 0 < usage.output_tokens <= 40
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert reply.tool_choice == "auto" and reply.tools == [] and reply.parallel_tool_calls is True


def test_streamed_text_with_the_sdk_helper(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=MODEL, input=FINISHES, max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert deltas and [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1
    text = "".join(deltas)
    assert final.output_text == text and events[-4].text == text
    whole = oai.responses.create(model=MODEL, input=FINISHES, max_output_tokens=40, temperature=0)
    assert whole.output_text == text  # greedy: streamed or not, the same reply


def test_create_stream_true_and_max_output_tokens_is_incomplete(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=6, stream=True))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage.output_tokens == 6
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert last.response.output_text == text and text
    whole = oai.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=6, temperature=0)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.output[0].status == "incomplete" and whole.usage.output_tokens == 6


def test_instructions_are_a_leading_system_message(oai: openai.OpenAI) -> None:
    pirate = "Answer like a pirate."
    plain = oai.responses.create(model=MODEL, input="Hi", max_output_tokens=8, temperature=0)
    told = oai.responses.create(model=MODEL, input="Hi", instructions=pirate, max_output_tokens=8, temperature=0)
    as_item = oai.responses.create(
        model=MODEL,
        input=[{"role": "system", "content": pirate}, {"role": "user", "content": "Hi"}],
        max_output_tokens=8,
        temperature=0,
    )
    assert told.instructions == pirate and plain.instructions is None
    assert told.usage.input_tokens == as_item.usage.input_tokens != plain.usage.input_tokens
    assert told.output_text == as_item.output_text


def test_input_items_with_parts_and_roles(oai: openai.OpenAI) -> None:
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
        {"role": "user", "content": "What is 2+2?"},
    ]
    reply = oai.responses.create(model=MODEL, input=items, max_output_tokens=8, temperature=0)  # type: ignore[arg-type]
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert reply.output_text.strip() and reply.output_text == chat.choices[0].message.content
    assert reply.usage.input_tokens == chat.usage.prompt_tokens  # the same prompt as the chat conversation


@needs_grammar
def test_json_schema_text_format(oai: openai.OpenAI) -> None:
    text_format = {"type": "json_schema", "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}
    reply = oai.responses.create(
        model=MODEL,
        input="Name a big city and its population.",
        text={"format": text_format},  # type: ignore[typeddict-item]
        max_output_tokens=40,
        temperature=0,
    )
    assert reply.status == "completed"
    jsonschema.validate(json.loads(reply.output_text), ANSWER_SCHEMA)
    assert reply.text.format.type == "json_schema"


@needs_grammar
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_named_tool_choice_is_one_function_call(oai: openai.OpenAI, stream: bool) -> None:
    request = dict(
        model=MODEL,
        input="What is 2 plus 3?",
        tools=[ADD],
        tool_choice={"type": "function", "name": "add"},
        max_output_tokens=40,
        temperature=0,
    )
    if stream:
        with oai.responses.stream(**request) as events_stream:  # type: ignore[arg-type]
            events = list(events_stream)
            reply = events_stream.get_final_response()
        kinds = [event.type for event in events]
        assert kinds[2:] == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert [event.sequence_number for event in events] == list(range(len(events)))
        assert events[3].delta == reply.output[0].arguments
    else:
        reply = oai.responses.create(**request)  # type: ignore[call-overload]
    assert reply.status == "completed" and reply.output_text == ""
    [call] = reply.output
    assert call.type == "function_call" and call.name == "add" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])


@needs_grammar
def test_a_tool_loop_call_then_output_then_text(oai: openai.OpenAI) -> None:
    items: list = [{"role": "user", "content": "What is 2 plus 3?"}]
    first = oai.responses.create(
        model=MODEL,
        input=items,
        tools=[ADD],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=40,
        temperature=0,
    )
    [call] = first.output
    assert call.type == "function_call"
    items += first.output  # the SDK's objects sent back as they came, as the SDK docs do
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "5"})
    final = oai.responses.create(
        model=MODEL, input=items, tools=[ADD], tool_choice="none", max_output_tokens=24, temperature=0
    )  # type: ignore[arg-type]
    assert [item.type for item in final.output] == ["message"] and final.output_text.strip()
    # The call and its result reach the prompt as the chat conversation with that tool call and tool message.
    messages = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": "add", "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "5"},
    ]
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=[{"type": "function", "function": {k: v for k, v in ADD.items() if k != "type"}}],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=24,
        temperature=0,
    )
    assert final.usage.input_tokens == chat.usage.prompt_tokens and final.output_text == chat.choices[0].message.content


def test_an_engine_fault_mid_stream_ends_it_with_response_failed(live_server: LiveServer, oai: openai.OpenAI) -> None:
    marker = "RESPONSES-FAULT-LATER"
    with ForcedFault(live_server.engine, marker, after=4):
        events = list(oai.responses.create(model=MODEL, input=marker, max_output_tokens=20, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.failed"
    assert "response.completed" not in kinds and "response.output_item.done" not in kinds
    if "response.output_text.delta" in kinds:  # text streamed before the fault: its message was announced first
        assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and "CUDA" not in failed.error.message
    assert [event.sequence_number for event in events] == list(range(len(events)))


REFUSED = {
    "previous_response_id": ({"previous_response_id": "resp_123"}, "previous_response_id", "send the whole"),
    "web_search": ({"tools": [{"type": "web_search"}]}, "tools.0.type", "web_search"),
    "reasoning": ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
    "background": ({"background": True}, "background", "background"),
    "include": ({"include": ["reasoning.encrypted_content"]}, "include", "include"),
    "image": (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        "input.0.content.0.type",
        "input_image",
    ),
    "unknown field": ({"frobnicate": 1}, "frobnicate", "not permitted"),
    "orphan output": (
        {
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "function_call_output", "call_id": "c9", "output": "1"},
            ]
        },
        "input.1.call_id",
        "function_call",
    ),
    "over the cap": ({"max_output_tokens": 10**6}, "max_output_tokens", "MAX_NEW_TOKENS_CAP"),
    "bad schema": (
        {"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
        "text.format",
        "name",
    ),
    "unknown tool choice": (
        {"tools": [ADD], "tool_choice": {"type": "function", "name": "sub"}},
        "tool_choice.name",
        "sub",
    ),
}


@pytest.mark.parametrize(("extra", "param", "words"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_fields_are_400s_naming_the_field(live_server: LiveServer, extra: dict, param: str, words: str) -> None:
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 8, **extra}
    response = httpx.post(f"{live_server.base_url}/v1/responses", headers=AUTH, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(param.split(".")[0]) and words in error["message"]


def test_sdk_raises_on_previous_response_id_and_unknown_model(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        oai.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        oai.responses.create(model="gpt-4o", input="Hi", max_output_tokens=8)
    assert missing.value.code == "model_not_found"


# --- ENGINE=remote in front of the module's live server ------------------------------------------------------


@pytest.fixture(scope="module")
def responses_front(live_server: LiveServer) -> Iterator[LiveServer]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, engine="remote", remote_url=f"{live_server.base_url}/v1", remote_api_key=API_KEY
    )
    engine = RemoteEngine(settings)
    front = start_live_server(settings, engine)
    deadline = time.monotonic() + 60  # a liveness limit: the front is ready at its first health check
    while not engine.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.ready
    yield front
    front.server.should_exit = True


def test_remote_engine_text_response(responses_front: LiveServer, oai: openai.OpenAI) -> None:
    through = openai_client(responses_front).responses.create(
        model=MODEL, input=FINISHES, max_output_tokens=40, temperature=0
    )
    direct = oai.responses.create(model=MODEL, input=FINISHES, max_output_tokens=40, temperature=0)
    assert through.status == direct.status == "completed"
    assert through.output_text == direct.output_text and through.output_text.strip()
    assert through.usage.output_tokens == direct.usage.output_tokens


def test_remote_engine_streamed_response(responses_front: LiveServer) -> None:
    front = openai_client(responses_front)
    with front.responses.stream(model=MODEL, input=FINISHES, max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas and final.output_text == deltas
