"""Tool calls on /v1/chat/completions (webapp/api/openai/tools.py): the generic format, constrained calls, history,
errors.

The tests marked `needs_grammar` need constrained decoding in the engines (GenerationRequest.response_format,
inference/sampling/grammar.py): `required` and named tool choices are forced through it, so they pass once the engines
honour `response_format`. The rest (parsing, prompt rendering on both templates, streaming of text replies, errors) do
not."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest

from bench.gemma_shape import build_tokenizer
from inference import GenerationResult, Message, TextDelta
from inference.model.loading import LoadedModel
from inference.text.prompt import PromptBuilder
from tests.helpers import ADD_FUNCTION, AUTH, LiveServer
from webapp.api.openai.protocol import OpenAIChatCompletionRequest
from webapp.api.openai.tools import MAX_PARALLEL_CALLS, ToolCalls, ToolUse, call_schema

# Constrained decoding (helper G's inference/sampling/grammar.py) is what forces `required` and named choices.
needs_grammar = pytest.mark.needs_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {"type": "function", "function": ADD_FUNCTION}
TOOLS = [WEATHER, ADD]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Jakarta?"}]
CALL_HISTORY = [
    *QUESTION,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Jakarta", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": "31 degrees, sunny"},
]


def use(**body: object) -> ToolUse:
    return ToolUse(OpenAIChatCompletionRequest.model_validate({"messages": QUESTION, "tools": TOOLS, **body}))


def assert_valid_call(call: object, names: set[str]) -> dict:
    assert call.id.startswith("call_") and call.type == "function"  # type: ignore[attr-defined]
    name = call.function.name  # type: ignore[attr-defined]
    assert name in names
    arguments = json.loads(call.function.arguments)  # type: ignore[attr-defined]
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


def streamed_calls(chunks: list) -> list[SimpleNamespace]:
    """The calls a stream's tool_calls pieces add up to, as a client assembles them (by index)."""
    calls: dict[int, SimpleNamespace] = {}
    for piece in (tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []):
        call = calls.setdefault(
            piece.index, SimpleNamespace(id=None, type=None, function=SimpleNamespace(name=None, arguments=""))
        )
        call.id, call.type = call.id or piece.id, call.type or piece.type
        call.function.name = call.function.name or piece.function.name
        call.function.arguments += piece.function.arguments or ""
    return list(calls.values())


# --- The parser (auto's decision) and the constraint's schema, no model -------------------------------


def test_the_exact_call_format_is_a_call() -> None:
    calls = use().parse('  {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}\n')
    assert calls is not None and len(calls) == 1
    assert calls[0].id.startswith("call_") and calls[0].function.name == "add"
    assert json.loads(calls[0].function.arguments) == {"a": 1, "b": 2}


def test_a_fenced_call_is_a_call_and_ids_differ() -> None:
    text = '```json\n{"tool_calls": [{"name": "add", "arguments": {}}, {"name": "add", "arguments": {"a": 1}}]}\n```'
    calls = use().parse(text)
    assert calls is not None and [c.function.name for c in calls] == ["add", "add"]
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({}, 'Sure! {"tool_calls": [{"name": "add", "arguments": {}}]}'),  # text around it
        ({}, '{"tool_calls": [{"name": "multiply", "arguments": {}}]}'),  # not an offered tool
        ({}, '{"tool_calls": [{"name": "add", "arguments": {}}], "note": 1}'),  # extra key
        ({}, '{"tool_calls": [{"name": "add", "arguments": "{}"}]}'),  # arguments not an object
        ({}, '{"tool_calls": []}'),
        ({}, '{"tool_calls": [{"name": "add", "arguments": {}'),  # cut short
        (
            {"parallel_tool_calls": False},
            '{"tool_calls": [{"name": "add", "arguments": {}}, {"name": "add", "arguments": {}}]}',
        ),
        ({"tool_choice": "none"}, '{"tool_calls": [{"name": "add", "arguments": {}}]}'),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            '{"tool_calls": [{"name": "add", "arguments": {}}]}',
        ),
    ],
)
def test_anything_else_is_text(body: dict, text: str) -> None:
    assert use(**body).parse(text) is None


def test_the_constraint_accepts_exactly_calls_of_the_chosen_tools() -> None:
    required = json.loads(use(tool_choice="required").response_format.schema)  # type: ignore[union-attr]
    good = {
        "tool_calls": [
            {"name": "add", "arguments": {"a": 1, "b": 2}},
            {"name": "get_weather", "arguments": {"city": "X", "unit": "celsius"}},
        ]
    }
    jsonschema.validate(good, required)
    for bad in (
        {"tool_calls": []},
        {"tool_calls": [{"name": "add", "arguments": {"a": 1}}]},  # missing b
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "X", "unit": "kelvin"}}]},
        {"tool_calls": [{"name": "nope", "arguments": {}}]},
        {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}], "text": "hi"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    named = use(tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    schema = json.loads(named.response_format.schema)  # type: ignore[union-attr]
    jsonschema.validate({"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}, schema)
    with pytest.raises(jsonschema.ValidationError):  # only the named tool
        jsonschema.validate(
            {"tool_calls": [{"name": "get_weather", "arguments": {"city": "X", "unit": "celsius"}}]}, schema
        )
    with pytest.raises(jsonschema.ValidationError):  # one call without parallel_tool_calls
        jsonschema.validate({"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}] * 2}, schema)
    assert use().response_format is None and use(tool_choice="none").response_format is None


@pytest.mark.parametrize("parallel", [None, True, False])
def test_a_named_tool_choice_is_exactly_one_call(parallel: bool | None) -> None:
    """A named function means one call of it (as vLLM decodes it), whatever parallel_tool_calls says: without this
    the embedded model repeated the same call until max_tokens (issue 27)."""
    named = use(tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=parallel)
    schema = json.loads(named.response_format.schema)  # type: ignore[union-attr]
    one = {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
    jsonschema.validate(one, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": one["tool_calls"] * 2}, schema)
    assert named.parse(json.dumps({"tool_calls": one["tool_calls"] * 2})) is None  # two calls are not a named reply
    assert "Call one tool per reply." in named.messages[0].content
    # `required` keeps allowing several unless parallel_tool_calls is false
    required = json.loads(use(tool_choice="required", parallel_tool_calls=parallel).response_format.schema)  # type: ignore[union-attr]
    assert required["properties"]["tool_calls"]["maxItems"] == (1 if parallel is False else MAX_PARALLEL_CALLS)


def test_refs_in_a_tool_schema_still_resolve_inside_the_call_schema() -> None:
    parameters = {
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    }
    tool = {"type": "function", "function": {"name": "visit", "parameters": parameters}}
    body = OpenAIChatCompletionRequest.model_validate({"messages": QUESTION, "tools": [tool]})
    schema = call_schema(body.tools or [], parallel=False)
    jsonschema.validate({"tool_calls": [{"name": "visit", "arguments": {"place": {"city": "Bogor"}}}]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "visit", "arguments": {"place": {"town": 1}}}]}, schema)


async def _events(tools: ToolUse, pieces: list[str]) -> list[object]:
    async def stream() -> AsyncIterator[object]:
        for piece in pieces:
            yield TextDelta(piece)
        yield GenerationResult("".join(pieces), 5, len(pieces), "stop")

    return [event async for event in tools.events(stream())]  # type: ignore[arg-type]


async def test_a_stream_holds_back_only_what_may_be_a_call() -> None:
    text = await _events(use(), ["Hello", " there"])
    assert [e.text for e in text if isinstance(e, TextDelta)] == ["Hello", " there"]
    call = await _events(use(), [" {", '"tool_calls": [{"name": "add", ', '"arguments": {"a": 1}}]}'])
    assert [type(e) for e in call] == [ToolCalls, GenerationResult]
    assert call[0].calls[0].function.name == "add"  # type: ignore[union-attr]
    not_a_call = await _events(use(), ["{", '"answer": 42}'])  # JSON, but not the call format: text after all
    assert [e.text for e in not_a_call if isinstance(e, TextDelta)] == ["{", '"answer": 42}']
    plain = await _events(use(tool_choice="none"), ['{"tool_calls": [{"name": "add", "arguments": {}}]}'])
    assert [type(e) for e in plain] == [TextDelta, GenerationResult]


# --- The prompt on both templates: the embedded ChatML one and Gemma2's (no system role, strict alternation) ---


def rendered(builder: PromptBuilder, messages: tuple[Message, ...]) -> str:
    return builder.tokenizer.decode(builder.build(messages))


@pytest.fixture(scope="module")
def templates(embedded_model: LoadedModel) -> dict[str, PromptBuilder]:
    return {"chatml": PromptBuilder(embedded_model.tokenizer), "gemma2": PromptBuilder(build_tokenizer())}


@pytest.mark.parametrize("template", ["chatml", "gemma2"])
def test_history_with_tool_calls_and_results_renders_on_both_templates(
    templates: dict[str, PromptBuilder], template: str
) -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        *CALL_HISTORY,
        {"role": "tool", "tool_call_id": "call_abc123", "content": "humid"},  # two results of one call
        {"role": "user", "content": "And tomorrow?"},
    ]
    tools = use(messages=history)
    prompt = rendered(templates[template], tools.messages)  # the template accepts it (Gemma2 raises otherwise)
    assert '"name": "get_weather"' in prompt and "Current weather in a city" in prompt  # the tools' description
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Jakarta", "unit": "celsius"}}]}' in prompt
    assert "Result of tool call call_abc123 (get_weather):\n31 degrees, sunny" in prompt and "humid" in prompt
    assert prompt.index("Be brief.") < prompt.index("get_weather") < prompt.index("And tomorrow?")
    none = rendered(templates[template], use(messages=history, tool_choice="none").messages)
    assert "Current weather in a city" not in none and "31 degrees, sunny" in none


# --- Over the wire with the openai SDK ------------------------------------------------------------------


@needs_grammar
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_gives_a_valid_call(oai: openai.OpenAI, choice: str, stream: bool) -> None:
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "add"}}
    names = {"get_weather", "add"} if choice == "required" else {"add"}
    request = dict(
        model="sahabat-ai",
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    if not stream:
        reply = oai.chat.completions.create(**request)  # type: ignore[call-overload]
        choice_ = reply.choices[0]
        assert choice_.finish_reason == "tool_calls" and choice_.message.content is None
        assert len(choice_.message.tool_calls) == 1
        assert_valid_call(choice_.message.tool_calls[0], names)
        return
    chunks = list(oai.chat.completions.create(stream=True, **request))  # type: ignore[call-overload]
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert pieces and pieces[0].index == 0 and pieces[0].id.startswith("call_") and pieces[0].type == "function"
    assert pieces[0].function.name in names and all(p.index == 0 for p in pieces)
    arguments = json.loads("".join(p.function.arguments or "" for p in pieces))
    jsonschema.validate(arguments, SCHEMAS[pieces[0].function.name])
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


CITY = {
    "type": "function",
    "function": {
        "name": "City",
        "description": "Information about a city",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
            "required": ["name", "country"],
        },
    },
}


@needs_grammar
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_named_tool_choice_without_parallel_tool_calls_is_one_call(oai: openai.OpenAI, stream: bool) -> None:
    """Issue 27's case: with up to 8 calls allowed the embedded model repeated this call until max_tokens, and the
    client got finish_reason "length", no tool_calls and the raw format as content."""
    request = dict(
        model="sahabat-ai",
        messages=[{"role": "user", "content": "Tell me about Jakarta."}],
        tools=[CITY],
        tool_choice={"type": "function", "function": {"name": "City"}},
        temperature=0,
        max_tokens=120,
    )
    if not stream:
        choice = oai.chat.completions.create(**request).choices[0]  # type: ignore[call-overload]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = [(call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls]
    else:
        chunks = list(oai.chat.completions.create(stream=True, **request))  # type: ignore[call-overload]
        pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert {p.index for p in pieces} == {0}
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["tool_calls"]
        calls = [(pieces[0].function.name, json.loads("".join(p.function.arguments or "" for p in pieces)))]
    assert len(calls) == 1 and calls[0][0] == "City"
    jsonschema.validate(calls[0][1], CITY["function"]["parameters"])


@needs_grammar
def test_round_trip_call_then_tool_result_then_answer(oai: openai.OpenAI) -> None:
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Jakarta, in celsius?"}]
    first = oai.chat.completions.create(
        model="sahabat-ai",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert_valid_call(call, {"get_weather"})
    messages.append(first.choices[0].message.model_dump(exclude_none=True))  # content null: dropped, as clients do
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "31 degrees celsius, sunny"})
    final = oai.chat.completions.create(
        model="sahabat-ai",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_tokens=24,
    )
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert answer.message.content and answer.message.content.strip()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("conversation", ["question", "after_a_call"])
def test_auto_answers_either_a_valid_call_or_text(oai: openai.OpenAI, conversation: str, stream: bool) -> None:
    """Whatever the model chooses: a call is well formed and ends with tool_calls, text is never the call format.

    Unconstrained, so the model decides; greedily, today, it answers the bare question in text and repeats the call
    after a call and its result (the history shows it the format), so both branches run on a real generation."""
    messages = QUESTION if conversation == "question" else CALL_HISTORY
    request = dict(model="sahabat-ai", messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    if stream:
        chunks = list(oai.chat.completions.create(stream=True, **request))  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = streamed_calls(chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = oai.chat.completions.create(**request)  # type: ignore[call-overload]
        text, calls = reply.choices[0].message.content or "", reply.choices[0].message.tool_calls or []
        finish = [reply.choices[0].finish_reason]
    if calls:
        assert finish == ["tool_calls"] and not text
        assert all(assert_valid_call(call, set(SCHEMAS)) is not None for call in calls)
    else:
        assert finish[0] in ("stop", "length") and text
        assert use().parse(text) is None


def test_auto_text_streams_as_it_does_without_tools(oai: openai.OpenAI) -> None:
    """Text held back while it might be a call is not lost: the stream's text is the whole reply's."""
    request = dict(model="sahabat-ai", messages=QUESTION, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=12)
    whole = oai.chat.completions.create(**request)  # type: ignore[call-overload]
    chunks = list(oai.chat.completions.create(stream=True, **request))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_history_with_tool_calls_is_accepted(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="sahabat-ai", messages=CALL_HISTORY, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 40  # type: ignore[union-attr]


def post(live_server: LiveServer, **body: object) -> httpx.Response:
    payload = {"model": "sahabat-ai", "messages": QUESTION, "max_tokens": 4, **body}
    return httpx.post(f"{live_server.base_url}/v1/chat/completions", headers=AUTH, json=payload, timeout=30)


def function(parameters: object, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
        ({"tools": [function({"type": 5})]}, "tools.0.function.parameters", "not a valid JSON Schema"),
        (
            {"tools": [function({"type": "object", "required": "a"})]},
            "tools.0.function.parameters",
            "not a valid JSON Schema",
        ),
        ({"tools": [function({"type": "string"})]}, "tools.0.function.parameters", '"type": "object"'),
        ({"tools": [function({"type": "object"}), function({"type": "object"})]}, "tools.1.function.name", "duplicate"),
        ({"tools": [function({"type": "object"}, name="has space")]}, "tools.0.function.name", "pattern"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
        (
            {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "x", "content": "r"}]},
            "messages.1.tool_call_id",
            "answers no tool call",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0", "content"),
        ({"functions": [function({"type": "object"})["function"]]}, "functions", "use tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "forces a call",
        ),
    ],
)
def test_bad_tool_fields_are_400_naming_the_field(live_server: LiveServer, body: dict, param: str, words: str) -> None:
    response = post(live_server, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    assert post(live_server).status_code == 200  # and the server keeps serving


# --- LangChain's bind_tools, unmodified ------------------------------------------------------------------


@needs_grammar
def test_langchain_bind_tools_forced(live_server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    def add(a: int, b: int) -> int:
        """Add two whole numbers."""
        return a + b

    llm = ChatOpenAI(
        base_url=f"{live_server.base_url}/v1",
        api_key=AUTH["Authorization"][7:],
        model="sahabat-ai",
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    message = llm.bind_tools([add], tool_choice="add").invoke("What is 2 plus 3?")
    assert [call["name"] for call in message.tool_calls] == ["add"]
    jsonschema.validate(message.tool_calls[0]["args"], SCHEMAS["add"])
    assert message.response_metadata["finish_reason"] == "tool_calls"
