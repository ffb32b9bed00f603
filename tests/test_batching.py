"""The batched engine against the real embedded model (and a tiny random Gemma2): correctness, not speed.

The equality tests (batched greedy text == sequential greedy text) run the embedded model in float32.
In bf16 the batched and the one-at-a-time forward passes round differently (other matmul shapes, left
padding), and this model has exact bf16 ties: for "Write one sentence about the sea." the logits of
" and" and "," after "The sea is a vast" are identical in bf16, so either engine may legitimately pick
either one. In float32 (a float32 copy of the loaded model) the ties are broken the same way and the texts must be
identical. In the served configuration (bf16, FAST_DECODE's lean passes) batched rows round differently from a
lone request, so there each token the batched engine picks is checked against the unbatched model's logits: it
must be the greedy choice up to bf16 rounding (a masking or position bug is off by whole logits, see
`assert_greedy_up_to_rounding`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference import BatchedEngine, EngineBusy, GenerationRequest, GenerationResult, Message, SequentialEngine
from inference.model.loading import LoadedModel
from inference.types import TextDelta
from tests.helpers import collect
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
    "Write one sentence about the sea.",
    "Halo!",
    "Jelaskan apa itu fotosintesis dengan bahasa yang mudah dipahami oleh anak sekolah dasar.",
]


# ~330 tokens with the chat template, against 40 for SHORT_TEXT: a row that joins (or is joined by) the other gets
# ~290 columns of left padding, which the attention mask must hide. Both, and STORY_TEXT, run past 30 tokens.
LONG_TEXT = (
    "Berikut adalah catatan perjalanan saya. "
    + "Pada hari pertama kami berangkat dari Jakarta menuju Bandung dengan kereta api pagi, "
    "melewati sawah hijau, sungai kecil, dan desa-desa yang tenang. " * 5 + "Ringkas catatan ini dalam dua kalimat."
)
SHORT_TEXT = "Hitung sampai 100."
STORY_TEXT = "Tell me a story."


def greedy(text: str, max_new_tokens: int = 12, **knobs: Any) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", text),), max_new_tokens=max_new_tokens, temperature=0.0, **knobs)


def sampled(text: str, max_new_tokens: int = 24, temperature: float = 1.0, **knobs: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("user", text),), max_new_tokens=max_new_tokens, temperature=temperature, **knobs
    )


class RecordingEngine(BatchedEngine):
    """The batched engine, keeping the token ids it sends each request (by request_id), terminators excluded."""

    def __init__(self, settings: Settings, loader: Any) -> None:
        super().__init__(settings, loader)
        self.sent: dict[str, list[int]] = {}

    def _post_many(self, items: Any) -> None:
        items = list(items)
        for slot, event in items:
            if isinstance(event, int):
                self.sent.setdefault(slot.request.request_id, []).append(event)
        super()._post_many(items)


def batched_engine(settings: Settings, loaded: LoadedModel, **overrides: Any) -> RecordingEngine:
    engine = RecordingEngine(settings.model_copy(update=overrides), loader=lambda _settings: loaded)
    engine.load()
    return engine


def assert_greedy_up_to_rounding(loaded: LoadedModel, prompt_ids: list[int], output_ids: list[int]) -> None:
    """Each output token is the argmax of the model's logits after the tokens before it, up to bf16 rounding.

    One unbatched forward over prompt + output gives every position's logits. Measured on the embedded model: a
    correct batched engine's picks are at most 0.25 below the top logit (a tie broken the other way by rounding);
    with the padding columns unmasked after a join they were 8-22 below.
    """
    import torch

    assert output_ids
    ids = torch.tensor([prompt_ids + output_ids[:-1]])
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0, len(prompt_ids) - 1 :].float()
    chosen = logits.gather(1, torch.tensor(output_ids)[:, None])[:, 0]
    gaps = logits.max(dim=1).values - chosen
    assert float(gaps.max()) <= 1.0, f"tokens {gaps.gt(1.0).nonzero().flatten().tolist()} are not greedy: {gaps}"


@pytest.fixture(scope="module")
def sequential(settings: Settings, model32: LoadedModel) -> Iterator[SequentialEngine]:
    engine = SequentialEngine(settings, loader=lambda _settings: model32)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def batched(settings: Settings, model32: LoadedModel) -> Iterator[RecordingEngine]:
    engine = batched_engine(settings, model32, max_batch=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def served_engine(settings: Settings, embedded_model: LoadedModel) -> Iterator[RecordingEngine]:
    """The served configuration: bf16, FAST_DECODE's lean passes, MAX_BATCH=auto."""
    engine = batched_engine(settings, embedded_model)
    yield engine
    engine.close()


async def wait_until(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def sequential_results(engine: SequentialEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    return [await engine.generate(request) for request in requests]


async def test_concurrent_greedy_requests_match_sequential(
    sequential: SequentialEngine, batched: BatchedEngine
) -> None:
    requests = [greedy(text, max_new_tokens=10 + 2 * i) for i, text in enumerate(PROMPTS)]
    expected = await sequential_results(sequential, requests)
    streams = [await batched.submit(request) for request in requests]
    got = await asyncio.gather(*(collect(stream) for stream in streams))
    for (deltas, result), reference in zip(got, expected, strict=True):
        assert result.text == reference.text
        assert "".join(deltas) == result.text
        assert result.output_length == reference.output_length
        assert result.finish_reason == reference.finish_reason
        assert result.input_length == reference.input_length
        assert result.time_to_first_token_s is not None and result.time_to_first_token_s <= result.duration_s
    assert batched.runner.max_rows_seen >= 2  # they really shared forward passes
    assert batched.info is not None and batched.info.engine == "batched"
    await wait_until(lambda: batched.running == 0)


JOINS = {  # the first request runs alone; the second joins after its 3rd delta, the third after its 8th
    "long joins short": (SHORT_TEXT, LONG_TEXT, STORY_TEXT),
    "short joins long": (LONG_TEXT, SHORT_TEXT, STORY_TEXT),
}
JOIN_TOKENS = 40  # each; the first request still runs when the third joins


@pytest.fixture(scope="module")
def sequential_texts(sequential: SequentialEngine) -> Callable[[str], Awaitable[GenerationResult]]:
    """The sequential engine's greedy JOIN_TOKENS reply to a prompt, generated once per module."""
    cache: dict[str, GenerationResult] = {}

    async def reference(text: str) -> GenerationResult:
        if text not in cache:
            cache[text] = await sequential.generate(greedy(text, max_new_tokens=JOIN_TOKENS))
        return cache[text]

    return reference


async def run_joins(
    engine: BatchedEngine, texts: tuple[str, ...], tag: str
) -> list[tuple[list[str], GenerationResult]]:
    requests = [
        greedy(text, max_new_tokens=JOIN_TOKENS, request_id=f"{tag}-{index}") for index, text in enumerate(texts)
    ]
    engine.runner.max_rows_seen = 0
    first = await engine.submit(requests[0])
    head: list[str] = []
    streams = [first]
    for request, after in zip(requests[1:], (3, 8), strict=True):
        while len(head) < after:
            event = await anext(first)
            assert isinstance(event, TextDelta), "the first request ended before the joins"
            head.append(event.text)
        assert engine.running >= 1
        streams.append(await engine.submit(request))
    results = list(await asyncio.gather(*map(collect, streams)))
    results[0] = (head + results[0][0], results[0][1])
    assert engine.runner.max_rows_seen == 3  # all three shared steps: the joins happened mid-way
    for deltas, result in results:
        assert "".join(deltas) == result.text
    await wait_until(lambda: engine.running == 0)
    return results


@pytest.mark.parametrize("order", JOINS)
async def test_requests_joining_at_different_steps_match_sequential(
    sequential_texts: Callable[[str], Awaitable[GenerationResult]], batched: BatchedEngine, order: str
) -> None:
    """float32: very different prompt lengths, joins at different steps, 30+ tokens: the sequential texts exactly."""
    texts = JOINS[order]
    expected = [await sequential_texts(text) for text in texts]
    lengths = sorted(r.input_length for r in expected[:2])
    assert lengths[0] <= 40 and lengths[1] >= 300, lengths  # very different prompt lengths (see LONG_TEXT)
    results = await run_joins(batched, texts, order)
    for (_, result), reference in zip(results, expected, strict=True):
        assert result.text == reference.text
        assert result.output_length == reference.output_length
        assert result.finish_reason == reference.finish_reason
    assert all(r.output_length >= 30 for r in expected)


@pytest.mark.parametrize("order", JOINS)
async def test_requests_joining_at_different_steps_are_greedy_in_the_served_dtype(
    served_engine: RecordingEngine, embedded_model: LoadedModel, order: str
) -> None:
    """bf16 with FAST_DECODE (the default): each token is the unbatched model's greedy pick up to rounding."""
    texts = JOINS[order]
    results = await run_joins(served_engine, texts, order)
    for index, (text, (_, result)) in enumerate(zip(texts, results, strict=True)):
        output_ids = served_engine.sent[f"{order}-{index}"]
        assert len(output_ids) == result.output_length >= 30
        assert_greedy_up_to_rounding(embedded_model, served_engine.prepare(greedy(text)), output_ids)


# Below the top token's probability at every step of PROMPTS[2]'s greedy reply at temperature 1 (measured in float32:
# 0.06 at the least, 0.06-1.0 over its 24 tokens), so the nucleus is that one token and the draw is the greedy pick.
TINY_TOP_P = 0.02


async def test_each_request_keeps_its_own_knobs(sequential: SequentialEngine, batched: BatchedEngine) -> None:
    """One batch, a different knob on each row, each pinned down to what it must give."""
    penalised = greedy(PROMPTS[1], max_new_tokens=24, repetition_penalty=1.3)
    reference, penalised_reference, plain_reference = await sequential_results(
        sequential, [greedy(PROMPTS[2], max_new_tokens=24), penalised, greedy(PROMPTS[1], max_new_tokens=24)]
    )
    assert penalised_reference.text != plain_reference.text  # the penalty changes this reply within 24 tokens
    words = reference.text.split()
    assert len(words) >= 3, reference.text
    stop_word = words[2]
    requests = [
        greedy(PROMPTS[2], max_new_tokens=24, stop=(stop_word,)),  # stops before its stop word
        greedy(PROMPTS[0], max_new_tokens=3),  # runs out of tokens
        greedy(PROMPTS[3], max_new_tokens=1),  # leaves right after its prefill
        penalised,  # a greedy row with a repetition penalty: the sequential engine's text (transformers' penalty)
        greedy(PROMPTS[1], max_new_tokens=24),  # the same prompt beside it, without the penalty
        sampled(PROMPTS[2], temperature=1.3, top_k=1, seed=7),  # top_k=1 leaves only the greedy token to draw
        sampled(PROMPTS[2], temperature=1.0, top_p=TINY_TOP_P, seed=8),  # so does a nucleus of one token
        sampled(PROMPTS[2], temperature=1.3, seed=7),  # the same draws without top_k: not the greedy text
    ]
    streams = [await batched.submit(request) for request in requests]
    results = [result for _, result in await asyncio.gather(*map(collect, streams))]
    stopped, length, single, with_penalty, without_penalty, top_k_1, tiny_top_p, free = results
    assert stopped.finish_reason == "stop"
    assert stop_word not in stopped.text
    assert reference.text.startswith(stopped.text) and len(stopped.text) < len(reference.text)
    assert length.finish_reason == "length" and length.output_length == 3
    assert single.output_length == 1 and single.finish_reason == "length" and single.text
    assert with_penalty.text == penalised_reference.text
    assert without_penalty.text == plain_reference.text
    assert top_k_1.text == reference.text
    assert tiny_top_p.text == reference.text
    assert free.text != reference.text
    await wait_until(lambda: batched.running == 0)


async def test_seeded_sampling_is_reproducible_whatever_the_batch(batched: BatchedEngine) -> None:
    """A seeded row draws from its own generator: the same text alone, again, beside other sampled rows and when it
    joins a batch whose rows have drawn already; another seed gives another text."""
    seeded = sampled(
        "Tulis puisi pendek tentang laut.", temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=1234
    )
    alone = await batched.generate(seeded)
    assert alone.output_length > 12
    assert (await batched.generate(seeded)).text == alone.text
    others = [sampled(text) for text in PROMPTS[:4]]  # unseeded neighbours, drawing at the same steps
    streams = [await batched.submit(request) for request in [*others[:2], seeded, *others[2:]]]
    results = [result for _, result in await asyncio.gather(*map(collect, streams))]
    assert results[2].text == alone.text
    running = await batched.submit(sampled(PROMPTS[1], max_new_tokens=200, seed=5))  # closed after the join
    for _ in range(3):
        assert isinstance(await anext(running), TextDelta)
    joined = await batched.generate(seeded)  # joins the running row mid-way
    assert batched.running == 1
    await running.aclose()  # type: ignore[attr-defined]
    assert joined.text == alone.text
    different_seed = await batched.generate(dataclasses.replace(seeded, seed=99))
    assert different_seed.text != alone.text
    await wait_until(lambda: batched.running == 0)


async def test_a_cancelled_request_leaves_the_batch_running(
    sequential: SequentialEngine, batched: BatchedEngine
) -> None:
    survivors = [greedy(PROMPTS[0], max_new_tokens=14), greedy(PROMPTS[2], max_new_tokens=14)]
    expected = await sequential_results(sequential, survivors)
    leaver = await batched.submit(greedy(PROMPTS[1], max_new_tokens=60))
    streams = [await batched.submit(request) for request in survivors]
    tasks = [asyncio.ensure_future(collect(stream)) for stream in streams]
    async for _event in leaver:
        break  # the client reads one delta and disconnects
    await leaver.aclose()  # type: ignore[attr-defined]
    results = [result for _, result in await asyncio.gather(*tasks)]
    assert [r.text for r in results] == [r.text for r in expected]
    await wait_until(lambda: batched.running == 0)


async def test_queue_limit_gives_engine_busy(settings: Settings, model32: LoadedModel) -> None:
    small = batched_engine(settings, model32, max_batch=1, max_queue=1)
    try:
        running = await small.submit(greedy(PROMPTS[1], max_new_tokens=30))
        waiting = await small.submit(greedy(PROMPTS[0], max_new_tokens=4))
        with pytest.raises(EngineBusy) as busy:
            await small.submit(greedy(PROMPTS[2], max_new_tokens=4))
        assert busy.value.retry_after_s >= 1
        await running.aclose()  # type: ignore[attr-defined]
        _, result = await collect(waiting)  # the waiting request is served once the slot frees up
        assert result.output_length > 0
        await wait_until(lambda: small.running == 0)
        _, result = await collect(await small.submit(greedy(PROMPTS[2], max_new_tokens=2)))  # room again
        assert result.output_length == 2
    finally:
        small.close()


async def test_full_queue_is_503_with_retry_after_over_http(settings: Settings, model32: LoadedModel) -> None:
    from fastapi.testclient import TestClient

    from tests.helpers import API_KEY, AUTH
    from webapp.server import create_app

    small = batched_engine(settings, model32, max_batch=1, max_queue=0)
    app = create_app(settings, small, [API_KEY], with_ui=False)
    running = await small.submit(greedy(PROMPTS[1], max_new_tokens=400))  # holds the only slot
    with TestClient(app) as client:  # its lifespan closes the engine on exit
        for stream in (False, True):
            body = {"text": "Halo", "max_new_tokens": 4, "stream": stream}
            response = client.post("/api/v1/generate-text", headers=AUTH, json=body)
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) >= 1
            assert "busy" in response.json()["detail"]
        await running.aclose()  # type: ignore[attr-defined]


async def test_queue_timeout_gives_engine_busy(settings: Settings, model32: LoadedModel) -> None:
    small = batched_engine(settings, model32, max_batch=1, max_queue=4, queue_timeout=0.3)
    try:
        running = await small.submit(greedy(PROMPTS[1], max_new_tokens=400))
        first = await running.__anext__()  # type: ignore[attr-defined]
        assert isinstance(first, TextDelta)
        waiting = await small.submit(greedy(PROMPTS[0], max_new_tokens=4))
        with pytest.raises(EngineBusy, match="QUEUE_TIMEOUT"):
            await collect(waiting)
        await running.aclose()  # type: ignore[attr-defined]
        await wait_until(lambda: small.running == 0 and small.queue_depth == 0)
    finally:
        small.close()


async def test_sequential_engine_queue_limit(settings: Settings, model32: LoadedModel) -> None:
    sequential = SequentialEngine(settings.model_copy(update={"max_queue": 0}), loader=lambda _s: model32)
    sequential.load()
    try:
        running = await sequential.submit(greedy(PROMPTS[0], max_new_tokens=3))
        with pytest.raises(EngineBusy):
            await sequential.submit(greedy(PROMPTS[0], max_new_tokens=3))
        await collect(running)
        _, result = await collect(await sequential.submit(greedy(PROMPTS[0], max_new_tokens=2)))
        assert result.output_length == 2
    finally:
        sequential.close()


async def test_default_dtype_batched_engine(
    settings: Settings, embedded_model: LoadedModel, served_engine: RecordingEngine
) -> None:
    """The served configuration (bf16, lean passes): a lone request is exactly the sequential one; in a batch, each
    token is the greedy pick up to rounding."""
    assert settings.max_batch == "auto" and served_engine.max_batch == 16  # MAX_BATCH=auto on CPU
    assert served_engine.lean_pass is not None  # FAST_DECODE's lean passes
    sequential_bf16 = SequentialEngine(settings, loader=lambda _settings: embedded_model)
    sequential_bf16.load()
    try:
        request = greedy(PROMPTS[0], max_new_tokens=16)
        assert (await served_engine.generate(request)).text == (await sequential_bf16.generate(request)).text
    finally:
        sequential_bf16.close()
    served_engine.runner.max_rows_seen = 0
    requests = [greedy(text, max_new_tokens=8, request_id=f"default-{i}") for i, text in enumerate(PROMPTS)]
    streams = [await served_engine.submit(request) for request in requests]
    results = [result for _, result in await asyncio.gather(*map(collect, streams))]
    assert all(r.text and 0 < r.output_length <= 8 for r in results)
    assert served_engine.runner.max_rows_seen >= 2
    for request in requests:
        assert_greedy_up_to_rounding(
            embedded_model, served_engine.prepare(request), served_engine.sent[request.request_id]
        )


def test_prefill_groups_trade_padding_against_passes() -> None:
    from inference.engines.batched.scheduling import plan_prefill_groups

    lengths = [48, 64, 40, 97, 38, 41, 55]
    groups = plan_prefill_groups(lengths, overhead=100, budget=8192)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each prompt exactly once
    assert groups == [[4, 2, 5, 0, 6], [1, 3]]  # shortest first; the 97-token prompt does not pad the short ones
    assert plan_prefill_groups(lengths, overhead=10_000, budget=8192) == [sorted(range(7), key=lambda i: lengths[i])]
    assert all(len(g) == 1 for g in plan_prefill_groups(lengths, overhead=0, budget=8192))
    assert plan_prefill_groups([4000, 4000, 4000], overhead=10_000, budget=8192) == [[0, 1], [2]]  # memory cap
    assert plan_prefill_groups([9000], overhead=100, budget=8192) == [[0]]  # a lone long prompt still runs
    assert plan_prefill_groups([], overhead=100, budget=8192) == []


def test_cpu_weights_are_aligned(embedded_model: LoadedModel) -> None:
    """Weights memory-mapped from safetensors (the model cache) are copied to aligned memory at load: a
    misaligned model decoded 5-10x slower on this CPU (see inference.model.memory.align_cpu_weights)."""
    import torch

    assert all(p.data_ptr() % 64 == 0 for p in embedded_model.model.parameters() if p.device.type == "cpu")
    weights = torch.nn.Linear(4, 4, bias=False)
    weights.weight.data = torch.zeros(17)[1:].view(4, 4)  # 4 bytes off
    from inference.model.memory import align_cpu_weights

    assert align_cpu_weights(weights) == 1 and weights.weight.data_ptr() % 64 == 0
    assert align_cpu_weights(weights) == 0


# ---- a tiny random Gemma2: sliding window attention and logit soft-capping through the batched engine ----


async def test_tiny_gemma2_sliding_window_through_the_batched_engine(settings: Settings, tmp_path: Path) -> None:
    """sahabat-ai's architecture (bench.gemma_shape's tiny Gemma2, window 16), loaded by the service's loader."""
    from bench.gemma_shape import TINY_SHAPE, gemma2_config, write_model_dir
    from inference.model.loading import load_model

    directory = write_model_dir(tmp_path / "gemma2", gemma2_config(TINY_SHAPE), seed=1234)
    gemma_settings = settings.model_copy(update={"model_id": str(directory), "dtype": "float32"})
    loaded = load_model(gemma_settings)
    config = loaded.model.config
    assert config.sliding_window == 16 and config.final_logit_softcapping and config.attn_logit_softcapping
    assert "sliding_attention" in config.layer_types
    sequential = SequentialEngine(gemma_settings, loader=lambda _s: loaded)
    sequential.load()
    batched = batched_engine(gemma_settings, loaded, max_batch=4)
    try:
        requests = [  # prompts of different lengths, outputs that run well past the 16-token window
            greedy(PROMPTS[3], max_new_tokens=30),
            greedy(PROMPTS[1], max_new_tokens=24),
            GenerationRequest(  # Gemma's template has no system role: the engine folds it into the user turn
                messages=(Message("system", "Jawab singkat."), Message("user", PROMPTS[2])),
                max_new_tokens=28,
                temperature=0.0,
            ),
        ]
        expected = await sequential_results(sequential, requests)
        assert all(r.output_length > 16 for r in expected)  # the random model babbles past the window
        first = await batched.submit(requests[0])
        head = await first.__anext__()  # type: ignore[attr-defined]
        rest_streams = [await batched.submit(request) for request in requests[1:]]  # these join mid-way
        results = await asyncio.gather(collect(first), *map(collect, rest_streams))
        assert isinstance(head, TextDelta)
        assert head.text + "".join(results[0][0]) == results[0][1].text == expected[0].text
        for (_, result), reference in zip(results, expected, strict=True):
            assert result.text == reference.text
            assert result.output_length == reference.output_length
        assert batched.runner.max_rows_seen >= 2
    finally:
        batched.close()
        sequential.close()
