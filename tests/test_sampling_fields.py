"""presence_penalty, frequency_penalty, min_p and logprobs (+ top_logprobs), per row, on the real embedded model.

The engines are checked against each other (a lone greedy request: same text, same logprobs), against a direct
forward pass (the reported logprobs are the model's log_softmax: penalties aside, temperature does not change
them), and against the rows beside them (a row with these features leaves the plain rows' greedy texts alone).
The routes are checked with the openai SDK (stream and not) and for their 400s.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from inference import BatchedEngine, GenerationRequest, GenerationResult, Message, SequentialEngine, TextDelta
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel
from inference.types import TokenLogprob
from tests.helpers import AUTH, LiveServer
from webapp.settings import Settings

REPETITIVE = "Write the word 'hello' twenty times."  # greedy: "Hello, hello, hello, ..." (20 commas in 40 tokens)
DAYS = "List the days of the week."


def request(text: str, max_new_tokens: int = 24, temperature: float = 0.0, **knobs: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("user", text),), max_new_tokens=max_new_tokens, temperature=temperature, **knobs
    )


async def run(engine: LocalEngine, req: GenerationRequest) -> tuple[list[TextDelta], GenerationResult]:
    deltas: list[TextDelta] = []
    async for event in await engine.submit(req):
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            assert isinstance(event, GenerationResult)
            return deltas, event
    raise AssertionError("the stream ended without a result")


def tokens_of(deltas: list[TextDelta]) -> list[TokenLogprob]:
    return [token for delta in deltas for token in delta.logprobs]


def assert_each_token_rides_where_its_text_ends(pieces: list[tuple[str, list[str]]]) -> None:
    """(delta text, its tokens' texts) in order: after each delta, the tokens so far are exactly those whose last
    character has been shown (the detokenizer holds text back, e.g. a trailing space until the next word)."""
    everything = [token for _, tokens in pieces for token in tokens]
    shown, reported = "", 0
    for text, tokens in pieces:
        shown += text
        reported += len(tokens)
        joined = "".join(everything[:reported])
        assert shown.startswith(joined), (shown, joined)
        if reported < len(everything):  # the next token is not yet complete in what was shown
            assert len(joined) + len(everything[reported]) > len(shown), (shown, joined, everything[reported])


# --- the engines -------------------------------------------------------------------------------------------------


async def test_greedy_penalties_and_logprobs_are_the_same_on_both_engines(
    shared_engines: dict[str, LocalEngine],
) -> None:
    req = request(REPETITIVE, max_new_tokens=30, presence_penalty=0.5, frequency_penalty=0.8, logprobs=3)
    got = {kind: await run(shared_engines[kind], req) for kind in ("batched", "sequential")}
    (b_deltas, batched), (s_deltas, sequential) = got["batched"], got["sequential"]
    plain = (await run(shared_engines["batched"], request(REPETITIVE, max_new_tokens=30)))[1]
    assert batched.text != plain.text  # the penalties changed the reply...
    assert batched.text == sequential.text  # ...the same way on both engines
    b_tokens, s_tokens = tokens_of(b_deltas), tokens_of(s_deltas)
    assert [t.token for t in b_tokens] == [t.token for t in s_tokens]
    assert len(b_tokens) == batched.output_length
    for b, s in zip(b_tokens, s_tokens, strict=True):
        assert b.logprob == pytest.approx(s.logprob, abs=1e-3)
        assert [text for text, _ in b.top] == [text for text, _ in s.top]


async def test_frequency_penalty_cuts_the_repeats(engine: LocalEngine) -> None:
    plain_deltas, _ = await run(engine, request(REPETITIVE, max_new_tokens=40, logprobs=0))
    penalised_deltas, _ = await run(engine, request(REPETITIVE, max_new_tokens=40, logprobs=0, frequency_penalty=1.0))
    plain = collections.Counter(t.token for t in tokens_of(plain_deltas))
    penalised = collections.Counter(t.token for t in tokens_of(penalised_deltas))
    token, repeats = plain.most_common(1)[0]
    assert repeats >= 10, plain  # the prompt really makes the model repeat itself
    assert penalised.most_common(1)[0][1] <= repeats // 2, (plain, penalised)
    assert penalised[token] < repeats


@pytest.mark.parametrize("kind", ["batched", "sequential"])
async def test_min_p_one_is_greedy(shared_engines: dict[str, LocalEngine], kind: str) -> None:
    engine = shared_engines[kind]
    greedy = (await run(engine, request(DAYS, max_new_tokens=20)))[1].text
    hot = {"temperature": 1.5, "seed": 11}
    sampled = (await run(engine, request(DAYS, max_new_tokens=20, **hot)))[1].text
    assert sampled != greedy  # without min_p this seed samples something else
    assert (await run(engine, request(DAYS, max_new_tokens=20, min_p=1.0, **hot)))[1].text == greedy


def forward_logprobs(engine: LocalEngine, req: GenerationRequest, text: str) -> tuple[list[int], Any]:
    """The reply's ids (re-encoded) and the model's own log_softmax at each of their positions, computed as a lone
    request is: the prompt in one forward pass (its last logits only, as `generate` asks), then one token per pass
    over the cache (on the native path the model's forward routes both to the GGUF's blocks)."""
    import torch
    from transformers import DynamicCache

    prompt = engine.prepare(req)
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    model = engine.model
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        first = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1)
        logits = [first.logits[0, -1]]
        for token in ids[:-1]:
            logits.append(model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1])
    return ids, torch.stack(logits).float().log_softmax(-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
async def test_logprobs_are_the_models_and_cover_every_token(engine: LocalEngine, temperature: float) -> None:
    req = request("Why is the sky blue?", max_new_tokens=20, temperature=temperature, seed=5, logprobs=5)
    deltas, result = await run(engine, req)
    tokens = tokens_of(deltas)
    assert len(tokens) == result.output_length  # one per generated token
    assert "".join(t.token for t in tokens) == result.text
    assert_each_token_rides_where_its_text_ends([(d.text, [t.token for t in d.logprobs]) for d in deltas])
    ids, direct = forward_logprobs(engine, req, result.text)
    assert [engine.tokenizer.decode([i]) for i in ids] == [t.token for t in tokens]
    # the batched engine's lean passes and the model's forward take the same path here; the re-encoded reply can split
    # differently at the end, and the logprobs may be float32 of bf16 logits (bound measured before)
    gaps = [
        abs(float(direct[i, token_id]) - t.logprob) for i, (token_id, t) in enumerate(zip(ids, tokens, strict=True))
    ]
    assert max(gaps) < 0.2 and sum(gaps) / len(gaps) < 0.05, gaps
    for t in tokens:
        values = [logprob for _, logprob in t.top]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert t.logprob <= values[0] + 1e-6
        if temperature == 0:
            # greedy: the chosen token is among the alternatives, a most likely one (bf16 has exact ties)
            assert (t.token, t.logprob) in t.top and t.logprob == values[0]


@pytest.mark.parametrize("kind", ["batched", "sequential"])
async def test_tokens_after_a_stop_are_not_reported(shared_engines: dict[str, LocalEngine], kind: str) -> None:
    engine = shared_engines[kind]
    full = (await run(engine, request(DAYS, max_new_tokens=20)))[1].text
    assert "Monday" in full
    deltas, result = await run(engine, request(DAYS, max_new_tokens=20, logprobs=0, stop=("Mon",)))
    assert result.text == full[: full.index("Mon")]
    joined = "".join(t.token for t in tokens_of(deltas))
    # Every token that shows text is reported, the one holding the start of the match too, and none after it.
    assert joined.startswith(result.text) and len(joined) > len(result.text)
    assert len(joined) - len(tokens_of(deltas)[-1].token) < len(result.text)


@pytest.fixture(scope="module")
def engines32(settings: Settings, model32: LoadedModel) -> Iterator[tuple[SequentialEngine, BatchedEngine]]:
    sequential, batched = SequentialEngine(settings, lambda _s: model32), BatchedEngine(settings, lambda _s: model32)
    sequential.load()
    batched.load()
    yield sequential, batched
    sequential.close()
    batched.close()


async def test_rows_with_these_features_leave_the_plain_rows_alone(
    engines32: tuple[SequentialEngine, BatchedEngine],
) -> None:
    sequential, batched = engines32
    plain = [request(text, max_new_tokens=16) for text in ("Apa ibu kota Indonesia?", DAYS, "Halo!")]
    expected = [(await sequential.generate(req)).text for req in plain]
    featured = [
        request(REPETITIVE, max_new_tokens=16, presence_penalty=1.5, frequency_penalty=1.5, logprobs=4),
        request(DAYS, max_new_tokens=16, temperature=0.9, seed=3, min_p=0.1, frequency_penalty=-1.0, logprobs=0),
    ]
    batched.runner.max_rows_seen = 0
    streams = [await batched.submit(req) for req in [featured[0], *plain, featured[1]]]
    results = await asyncio.gather(*(run_stream(stream) for stream in streams))
    assert batched.runner.max_rows_seen >= 4  # they shared passes
    assert [result.text for _, result in results[1:4]] == expected
    assert len(tokens_of(results[0][0])) == results[0][1].output_length
    assert all(not delta.logprobs for deltas, _ in results[1:4] for delta in deltas)


async def run_stream(stream: Any) -> tuple[list[TextDelta], GenerationResult]:
    deltas: list[TextDelta] = []
    async for event in stream:
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("the stream ended without a result")


# --- the routes --------------------------------------------------------------------------------------------------


def test_openai_sdk_parses_logprobs_stream_and_not(oai: openai.OpenAI) -> None:
    fields: dict[str, Any] = {
        "model": "sahabat-ai",
        "messages": [{"role": "user", "content": DAYS}],
        "max_tokens": 20,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "frequency_penalty": 0.3,
        "presence_penalty": 0.2,
        "extra_body": {"min_p": 0.05},  # an extension: the SDK sends it as given
    }
    whole = oai.chat.completions.create(**fields)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 3
        assert t.token in [top.token for top in t.top_logprobs] and t.top_logprobs[0].logprob == t.logprob
    chunks = list(oai.chat.completions.create(**fields, stream=True))
    pieces = []
    for chunk in chunks:
        delta = chunk.choices[0]
        if delta.delta.content:
            assert delta.logprobs is not None and delta.logprobs.content is not None
        pieces.append((delta.delta.content or "", delta.logprobs.content if delta.logprobs else []))
    assert_each_token_rides_where_its_text_ends([(text, [t.token for t in tokens]) for text, tokens in pieces])
    streamed = [t for _, tokens in pieces for t in tokens or []]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = oai.chat.completions.create(**{**fields, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_spec_routes_take_the_sampling_fields(live_server: LiveServer, oai: openai.OpenAI) -> None:
    knobs = {"frequency_penalty": 1.0, "presence_penalty": 0.5, "min_p": 0.2}
    body = {"text": REPETITIVE, "max_new_tokens": 24, "temperature": 0, "system_message": ""}
    url = f"{live_server.base_url}/api/v1/generate-text"
    plain = httpx.post(url, headers=AUTH, json=body, timeout=120).json()["generated_text"]
    penalised = httpx.post(url, headers=AUTH, json={**body, **knobs}, timeout=120).json()["generated_text"]
    assert penalised != plain
    messages = [{"role": "user", "content": REPETITIVE}]
    same = oai.chat.completions.create(
        model="sahabat-ai", messages=messages, max_tokens=24, temperature=0, extra_body=knobs
    )
    assert same.choices[0].message.content == penalised


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ],
)
def test_bad_values_are_400_naming_the_field(oai: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(
            model="sahabat-ai", messages=[{"role": "user", "content": "hi"}], max_tokens=2, **extra
        )
    error = raised.value.body
    assert isinstance(error, dict) and param in error["message"] and error["param"] == param, error


@pytest.mark.parametrize(("field", "value"), [("min_p", -0.1), ("presence_penalty", 3), ("frequency_penalty", "1")])
def test_spec_route_bad_values_are_400_naming_the_field(live_server: LiveServer, field: str, value: Any) -> None:
    body = {"text": "hi", "max_new_tokens": 2, field: value}
    response = httpx.post(f"{live_server.base_url}/api/v1/chat", headers=AUTH, json=body, timeout=60)
    assert response.status_code == 400 and field in response.json()["detail"], response.text
