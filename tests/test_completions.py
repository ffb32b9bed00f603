"""POST /v1/completions (OpenAI's legacy text-completion route) and GET /v1/models/{id}, with the official openai
client against a real server, on both engines: raw prompts (no chat template), lists of prompts run together,
stream and not, echo, stop, usage, the refusals, and the model-name policy."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from inference import GenerationRequest
from inference.model.loading import LoadedModel
from inference.types import TokenLogprob
from tests.helpers import API_KEY, AUTH, LiveServer, both_engines, engine_for, sse_events_from_lines
from webapp.api.openai.completions import legacy_logprobs
from webapp.api.openai.completions_protocol import MAX_PROMPTS
from webapp.server import create_app
from webapp.settings import Settings

pytestmark = both_engines  # a list of prompts is one batch on the batched engine, a queue on the sequential one

SERVED = "SmolLM2-135M-Instruct-Q4_1"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]


def complete(oai: openai.OpenAI, prompt: str | list[str], **extra: object):
    return oai.completions.create(model="sahabat-ai", prompt=prompt, temperature=0, **extra)  # type: ignore[arg-type]


def test_a_raw_prompt_is_continued_as_it_is_without_the_chat_template(oai: openai.OpenAI, live_server) -> None:
    completion = complete(oai, PROMPTS[0], max_tokens=6)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == SERVED
    [choice] = completion.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text.strip()
    # The prompt's tokens are the text's own (the chat template would add a dozen): usage counts exactly them.
    tokenizer = live_server.engine.tokenizer
    assert completion.usage.prompt_tokens == len(tokenizer(PROMPTS[0])["input_ids"])
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6
    # ... and the text is the model's greedy continuation of exactly those ids.
    engine = live_server.engine
    assert engine.prepare(GenerationRequest(messages=(), prompt=PROMPTS[0], max_new_tokens=6)) == list(
        tokenizer(PROMPTS[0])["input_ids"]
    )


def test_a_list_of_prompts_gives_one_choice_each_as_alone(oai: openai.OpenAI) -> None:
    alone = [complete(oai, prompt, max_tokens=6) for prompt in PROMPTS]
    together = complete(oai, PROMPTS, max_tokens=6)
    assert [c.index for c in together.choices] == [0, 1]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone) == 12


def test_streamed_choices_join_to_the_whole_reply(oai: openai.OpenAI) -> None:
    whole = complete(oai, PROMPTS, max_tokens=6)
    chunks = list(complete(oai, PROMPTS, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    for index, choice in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_echo_puts_the_prompt_before_the_text_stream_and_not(oai: openai.OpenAI) -> None:
    plain = complete(oai, PROMPTS[1], max_tokens=4)
    echoed = complete(oai, PROMPTS[1], max_tokens=4, echo=True)
    assert echoed.choices[0].text == PROMPTS[1] + plain.choices[0].text
    assert echoed.usage == plain.usage
    chunks = list(complete(oai, PROMPTS[1], max_tokens=4, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPTS[1]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_stop_ends_the_text_before_the_match(oai: openai.OpenAI) -> None:
    free = complete(oai, PROMPTS[1], max_tokens=8).choices[0]
    assert " 6" in free.text  # the greedy count goes on: 5, 6, ...
    stopped = complete(oai, PROMPTS[1], max_tokens=8, stop=[" 6"]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(" 6")]
    streamed = list(complete(oai, PROMPTS[1], max_tokens=8, stop=" 6", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.text


def test_max_tokens_defaults_to_16(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model="sahabat-ai", prompt="Once upon a time", temperature=0)
    assert completion.usage.completion_tokens <= 16
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 16


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"suffix": "and so on"}, "suffix", "suffix"),
        ({"n": 2}, "n", "n=1"),
        ({"best_of": 3}, "best_of", "best_of"),
        ({"echo": True, "logprobs": 2}, "echo", "logprobs"),
        ({"logprobs": 6}, "logprobs", "5"),
        ({"max_tokens": 10**6}, "max_tokens", "MAX_NEW_TOKENS_CAP"),
        ({"prompt": [1, 2, 3]}, "prompt", "token-id"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": ["a"] * 17}, "prompt", "16"),
        ({"prompt": "\u0013"}, "prompt", "no tokens"),  # a control character alone: the tokenizer drops it
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)
def test_what_the_route_cannot_do_is_a_400_naming_the_field(
    oai: openai.OpenAI, extra: dict, param: str, words: str
) -> None:
    body = {"prompt": "Halo", "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as raised:
        oai.completions.create(model="sahabat-ai", **body)  # type: ignore[call-overload]
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_the_openapi_document_states_the_prompt_rules(live_server: LiveServer) -> None:
    """What the validator enforces, stated where clients and fuzzers read it (issue 28): a non-empty prompt, a list of
    1 to MAX_PROMPTS non-empty prompts, `suffix` only empty or null."""
    schema = httpx.get(f"{live_server.base_url}/openapi.json").json()
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    text, texts = fields["prompt"]["anyOf"]
    assert text["minLength"] == 1 and texts["items"]["minLength"] == 1
    assert (texts["minItems"], texts["maxItems"]) == (1, MAX_PROMPTS)
    assert {"type": "string", "maxLength": 0} in fields["suffix"]["anyOf"]


# Runs to its limit uncancelled, greedy (tests/test_cancellation.py measures 450 of 450 tokens).
LONG_PROMPT = "Hitung dari 1 sampai 400, satu angka per baris."


def test_a_list_is_admitted_whole_or_not_at_all(embedded_model: LoadedModel, engine_kind: str) -> None:
    """A list longer than the queue's room is a 503 and leaves nothing behind: the prompts admitted before the
    refusal are cancelled (a waiting one leaves the queue at once, a running row at the engine's next step), so the
    engine is idle again without generating them, and a list that fits is served."""
    settings = Settings(model_id="embedded", max_batch=1, max_queue=1, _env_file=None)  # type: ignore[call-arg]
    engine = engine_for(settings, embedded_model, engine_kind)
    with TestClient(create_app(settings, engine, [API_KEY], with_ui=False)) as client:
        body = {"model": "sahabat-ai", "max_tokens": 1, "temperature": 0}
        before = engine.generated_tokens_total
        refused = client.post(
            "/v1/completions", headers=AUTH, json={**body, "max_tokens": 200, "prompt": [LONG_PROMPT] * 3}
        )
        assert refused.status_code == 503 and "busy" in refused.json()["error"]["message"]
        assert "Retry-After" in refused.headers
        deadline = time.monotonic() + 60  # a hang guard only: the cancelled rows leave within a step or two
        while engine.running or engine.queue_depth:
            assert time.monotonic() < deadline, "the refused list's prompts were never released"
            time.sleep(0.01)
        assert engine.generated_tokens_total - before <= 4  # not the 200 each of them asked for
        served = client.post("/v1/completions", headers=AUTH, json={**body, "prompt": ["Halo"] * 2})
        assert served.status_code == 200, served.text
        assert [c["index"] for c in served.json()["choices"]] == [0, 1]


def test_an_unknown_model_is_a_404_model_not_found_on_both_routes(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Halo", max_tokens=1)
    assert raised.value.code == "model_not_found" and "gpt-3.5-turbo-instruct" in raised.value.message
    assert "sahabat-ai" in raised.value.message and SERVED in raised.value.message  # what to ask for instead
    with pytest.raises(openai.NotFoundError) as raised:
        oai.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Halo"}])
    assert raised.value.code == "model_not_found" and raised.value.body["param"] == "model"  # type: ignore[index]
    # The served id works as well as the alias; no model at all means the served one.
    served = oai.completions.create(model=SERVED, prompt="Halo", max_tokens=1, temperature=0)
    assert served.model == SERVED
    bare = httpx.post(f"{oai.base_url}completions", headers=AUTH, json={"prompt": "Halo", "max_tokens": 1}, timeout=600)
    assert bare.status_code == 200 and bare.json()["model"] == SERVED


def test_models_lists_exactly_the_names_accepted_and_retrieves_each(oai: openai.OpenAI) -> None:
    listed = [m.id for m in oai.models.list().data]
    assert listed == [SERVED, "sahabat-ai"]
    for name in listed:
        model = oai.models.retrieve(name)
        assert model.id == name and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        oai.models.retrieve("gpt-4o")
    assert raised.value.code == "model_not_found" and "gpt-4o" in raised.value.message


def test_a_stream_of_a_list_carries_every_choice_to_its_end_then_done_once(
    oai: openai.OpenAI, live_server: LiveServer
) -> None:
    """The second prompt meets the stop sequence at once, the first runs to max_tokens: the stream goes on until
    both have ended, each with its own finish_reason, and sends `[DONE]` once, last."""
    body = {"model": "sahabat-ai", "prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "stop": [" 5"]}
    whole = complete(oai, PROMPTS, max_tokens=6, stop=[" 5"])
    assert [c.finish_reason for c in whole.choices] == ["length", "stop"]
    url = f"{live_server.base_url}/v1/completions"
    with httpx.stream("POST", url, headers=AUTH, json={**body, "stream": True}, timeout=600) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        data = [d for _, d in sse_events_from_lines(response.iter_lines())]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    choices = [json.loads(d)["choices"][0] for d in data[:-1]]
    for index, expected in enumerate(whole.choices):
        mine = [c for c in choices if c["index"] == index]
        assert "".join(c["text"] for c in mine) == expected.text
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [expected.finish_reason]


def test_legacy_logprobs_shape(engine_kind: str) -> None:
    if engine_kind != "batched":
        pytest.skip("pure shaping, no engine: once is enough")
    tokens = [TokenLogprob(" Paris", -0.5, ((" Paris", -0.5), (" Lyon", -2.0))), TokenLogprob(".", -0.1, ())]
    shaped = legacy_logprobs(tokens, offset=10)
    assert shaped.tokens == [" Paris", "."] and shaped.token_logprobs == [-0.5, -0.1]
    assert shaped.top_logprobs == [{" Paris": -0.5, " Lyon": -2.0}, {".": -0.1}]
    assert shaped.text_offset == [10, 16]


def test_logprobs_come_back_in_the_legacy_shape(oai: openai.OpenAI) -> None:
    completion = complete(oai, PROMPTS[0], max_tokens=4, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 4
    assert "".join(logprobs.tokens or []) == completion.choices[0].text
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs or [])
    assert (logprobs.text_offset or [None])[0] == 0


def test_response_format_constrains_a_completion_to_the_schema(oai: openai.OpenAI) -> None:
    """The same `response_format` as the chat route (webapp/api/openai/builder.py), on a raw prompt."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Jakarta", "Bandung", "Surabaya"]}, "capital": {"type": "boolean"}},
        "required": ["city", "capital"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    completion = complete(oai, "A city as JSON:", max_tokens=60, extra_body={"response_format": response_format})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), schema)
    with pytest.raises(openai.BadRequestError) as raised:
        complete(oai, "Halo", max_tokens=2, extra_body={"response_format": {"type": "xml"}})
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == "response_format"
