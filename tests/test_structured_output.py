"""Structured output (`response_format`) on the real embedded model, through the openai SDK against a live server.

Every reply under a schema parses (`json.loads`) and validates (`jsonschema`), on both local engines; a lone greedy
constrained request gives the same text on both. Inside the batched engine a constrained row leaves the other rows'
greedy text as it is alone, and rows without a grammar are never masked. Bad formats and schemas are a 400 naming
`response_format`; a schema compiles once (the cache); a reply cut by max_tokens ends with finish_reason "length".
Schemas bound their strings and arrays (`maxLength`, `maxItems`) so that the JSON closes within a few dozen tokens.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from inference import BatchedEngine, GenerationRequest, GenerationResult, Message, ResponseFormat
from inference.engines.remote import RemoteEngine
from inference.model.loading import LoadedModel
from inference.sampling import grammar as grammar_module
from inference.sampling import sampler as sampling
from tests.helpers import API_KEY, LiveServer, both_engines, engine_for, openai_client, start_live_server
from webapp.settings import Settings

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "required fields": ("Describe a person as JSON.", PERSON),
    "nested objects": (
        "Give a city and its mayor as JSON.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "mayor": PERSON,
            },
            "required": ["city", "mayor"],
        },
    ),
    "enum": (
        "Is the sky blue? Answer as JSON.",
        {
            "type": "object",
            "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
            "required": ["answer", "sure"],
        },
    ),
    "array": (
        "List three fruits as JSON.",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 10},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["fruits"],
        },
    ),
}
ENOUGH_TOKENS = 60  # every schema above closes well within this (greedy, measured: 10-40 tokens)


def schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def ask(live: LiveServer, prompt: str, response_format: dict[str, Any], **fields: Any) -> Any:
    fields = {"temperature": 0, "max_tokens": ENOUGH_TOKENS, **fields}
    return openai_client(live).chat.completions.create(
        model="sahabat-ai",
        messages=[{"role": "user", "content": prompt}],
        response_format=response_format,  # type: ignore[arg-type]
        **fields,
    )


@both_engines
@pytest.mark.parametrize("case", SCHEMAS)
def test_every_reply_parses_and_validates(live_server: LiveServer, case: str) -> None:
    prompt, schema = SCHEMAS[case]
    completion = ask(live_server, prompt, schema_format(schema))
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)


@both_engines
def test_json_object_and_sampled_replies(live_server: LiveServer) -> None:
    completion = ask(live_server, 'What is 2+2? Answer in JSON with the key "answer".', {"type": "json_object"})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)
    for seed in (1, 2):  # sampled rows are masked before temperature and top_p: still valid
        sampled = ask(
            live_server, "Describe a person as JSON.", schema_format(PERSON), temperature=1.0, top_p=0.9, seed=seed
        )
        jsonschema.validate(json.loads(sampled.choices[0].message.content), PERSON)


@both_engines
def test_streamed_reply_is_the_same_json(live_server: LiveServer) -> None:
    prompt, schema = SCHEMAS["enum"]
    whole = ask(live_server, prompt, schema_format(schema)).choices[0].message.content
    chunks = list(ask(live_server, prompt, schema_format(schema), stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_greedy_text_is_the_same_on_both_engines(shared_live_servers: dict[str, LiveServer]) -> None:
    prompt, schema = SCHEMAS["nested objects"]
    texts = {
        kind: ask(shared_live_servers[kind], prompt, schema_format(schema)).choices[0].message.content
        for kind in ("batched", "sequential")
    }
    assert texts["batched"] == texts["sequential"], texts
    jsonschema.validate(json.loads(texts["batched"]), schema)


def test_max_tokens_cut_mid_json_is_finish_length(live_server: LiveServer) -> None:
    """Documented: the grammar cannot close the JSON in fewer tokens than it needs; the reply is cut, unparsable."""
    prompt, schema = SCHEMAS["required fields"]
    full = ask(live_server, prompt, schema_format(schema)).choices[0].message.content
    cut = ask(live_server, prompt, schema_format(schema), max_tokens=3).choices[0]
    assert cut.finish_reason == "length"
    assert full.startswith(cut.message.content) and cut.message.content != full
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.message.content)


BAD_FORMATS: dict[str, tuple[Any, str]] = {
    "unknown type": ({"type": "xml"}, "type must be one of"),
    "json_schema without its object": ({"type": "json_schema"}, "json_schema"),
    "schema missing": ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    "schema not an object": (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
        "JSON Schema object",
    ),
    "bad name": ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
    "unknown type keyword": (schema_format({"type": "strin"}), "strin"),
    "bad pattern": (schema_format({"type": "string", "pattern": "("}), "unclosed group"),
    "dangling $ref": (schema_format({"$ref": "#/$defs/missing"}), "/$defs/missing"),
    "strict with an unsupported keyword": (schema_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
}


@pytest.mark.parametrize("case", BAD_FORMATS)
def test_bad_formats_and_schemas_are_a_400_naming_response_format(live_server: LiveServer, case: str) -> None:
    response_format, words = BAD_FORMATS[case]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(live_server, "Halo", response_format, max_tokens=1)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "response_format", error
    assert "response_format" in error["message"] and words in error["message"], error["message"]


def test_non_strict_schema_ignores_what_it_cannot_enforce(live_server: LiveServer) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
    completion = ask(live_server, "Three numbers as JSON.", schema_format(schema, strict=False))
    assert isinstance(json.loads(completion.choices[0].message.content), list)


def test_a_schema_compiles_once(live_server: LiveServer) -> None:
    grammars = live_server.engine.grammars  # type: ignore[attr-defined]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reordered = {"required": ["ok"], "properties": {"ok": {"type": "boolean"}}, "type": "object"}
    compiled, hits = grammars.compiled, grammars.cache_hits
    ask(live_server, "Halo", schema_format(schema), max_tokens=2)
    assert (grammars.compiled, grammars.cache_hits) == (compiled + 1, hits)
    ask(live_server, "Apa kabar?", schema_format(reordered), max_tokens=2)  # same schema, other key order
    assert (grammars.compiled, grammars.cache_hits) == (compiled + 1, hits + 1)
    ask(live_server, "Halo", schema_format(schema, strict=False), max_tokens=2)  # strictness is part of the key
    assert grammars.compiled == compiled + 2


def test_strict_closes_objects_non_strict_does_not(live_server: LiveServer) -> None:
    """OpenAI's strict mode: no properties beyond the listed ones unless the schema allows them."""
    grammars = live_server.engine.grammars  # type: ignore[attr-defined]
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    extra = live_server.engine.tokenizer.encode('{"a":1,"b":2}', add_special_tokens=False)  # type: ignore[attr-defined]
    strict = grammars.compile(ResponseFormat("json_schema", schema, strict=True))
    loose = grammars.compile(ResponseFormat("json_schema", schema, strict=False))
    assert loose.matcher.try_consume_tokens(extra) == len(extra)
    assert strict.matcher.try_consume_tokens(extra) < len(extra)


def test_remote_engine_forwards_response_format(live_server: LiveServer, settings: Settings) -> None:
    """ENGINE=remote passes response_format on; the upstream (this service, batched) enforces it."""
    remote_settings = Settings(  # type: ignore[call-arg]
        _env_file=None, engine="remote", remote_url=f"{live_server.base_url}/v1", remote_api_key=API_KEY
    )
    engine = RemoteEngine(remote_settings)
    front = start_live_server(remote_settings, engine)
    try:
        deadline = time.monotonic() + 60  # a liveness limit only: the probe takes milliseconds
        while not engine.ready:
            assert time.monotonic() < deadline, "the remote engine did not find its upstream"
            time.sleep(0.05)
        prompt, schema = SCHEMAS["enum"]
        remote = ask(front, prompt, schema_format(schema)).choices[0].message.content
        direct = ask(live_server, prompt, schema_format(schema)).choices[0].message.content
        assert remote == direct
        jsonschema.validate(json.loads(remote), schema)
    finally:
        front.server.should_exit = True


# --- inside the batched engine: a constrained row among plain rows -----------------------------------------------

PLAIN = ["Apa ibu kota Indonesia?", "Write one sentence about the sea.", "Hitung sampai 100."]


@pytest.fixture(scope="module")
def batched32(settings: Settings, embedded_model: LoadedModel) -> Iterator[BatchedEngine]:
    """The batched engine on a float32 copy of the model: batched and lone greedy rows round alike (test_batching)."""
    import torch

    model = copy.deepcopy(embedded_model.model).to(torch.float32).eval()
    loaded = LoadedModel(model, embedded_model.tokenizer, dataclasses.replace(embedded_model.info, dtype="float32"))
    engine = engine_for(settings, loaded, "batched")
    yield engine
    engine.close()


def plain(text: str) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", text),), max_new_tokens=16, temperature=0.0)


async def generate_together(engine: BatchedEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    streams = [await engine.submit(request) for request in requests]

    async def last(stream: Any) -> GenerationResult:
        async for event in stream:
            if isinstance(event, GenerationResult):
                return event
        raise AssertionError("no result")

    return list(await asyncio.gather(*map(last, streams)))


async def test_a_constrained_row_leaves_the_plain_rows_unchanged(
    batched32: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    masked_rows: list[int] = []
    original = grammar_module.apply_masks

    def spy(scores: Any, rows: Any) -> None:
        rows = list(rows)
        masked_rows.extend(row for row, _ in rows)
        original(scores, rows)

    monkeypatch.setattr(sampling, "apply_masks", spy)
    alone = [await batched32.generate(plain(text)) for text in PLAIN]
    assert masked_rows == []  # no constrained row: no mask work at all
    prompt, schema = SCHEMAS["required fields"]
    constrained = GenerationRequest(
        messages=(Message("user", prompt),),
        max_new_tokens=ENOUGH_TOKENS,
        temperature=0.0,
        response_format=ResponseFormat("json_schema", json.dumps(schema)),
    )
    batched32.runner.max_rows_seen = 0
    *together, structured = await generate_together(batched32, [plain(text) for text in PLAIN] + [constrained])
    assert batched32.runner.max_rows_seen == 4  # they shared passes
    assert [r.text for r in together] == [r.text for r in alone]
    jsonschema.validate(json.loads(structured.text), schema)
    assert structured.finish_reason == "stop"
    assert len(masked_rows) == structured.output_length  # one masked row per step of the constrained request only


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_with_structured_output(live_server: LiveServer, method: str) -> None:
    """LangChain's `with_structured_output`, unmodified: its default (`json_schema`, a pydantic model), `json_mode`."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city and whether it is its country's capital."""

        name: str = Field(max_length=20)
        capital: bool

    llm = ChatOpenAI(
        base_url=f"{live_server.base_url}/v1",
        api_key=API_KEY,
        model="sahabat-ai",
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    prompt = "Name the capital of Indonesia as JSON with the keys name and capital."
    if method == "json_schema":
        city = llm.with_structured_output(City).invoke(prompt)
        assert isinstance(city, City)
    else:
        reply = llm.with_structured_output(City.model_json_schema(), method="json_mode").invoke(prompt)
        assert isinstance(reply, dict)  # json_mode promises a JSON object, not the schema
