"""The lean passes: the lean Llama forward (inference/cpu/lean_forward.py, the `lean` path) vs transformers' forward on
the real embedded model with GGUF_INT4=false (bf16 where the CPU has native bf16 matmuls, else float32), and the batched
engine's lean loop on the engine users get (the `native` path: its arithmetic is tested in test_native_forward.py)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch

from inference import BatchedEngine, GenerationRequest, Message, SequentialEngine
from inference.cpu.lean_forward import LeanForward, bucket_rows
from inference.cpu.passes import DecodeRows, PromptRow
from inference.engines.batched.kv_cache import new_cache
from inference.model.loading import LoadedModel, load_model
from inference.types import GenerationFailed, TextDelta
from tests.helpers import collect
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write one sentence about the sea.",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
]


@pytest.fixture(scope="module")
def lean_model(settings: Settings) -> LoadedModel:
    """The embedded model on the lean path (GGUF_INT4=false): prepacked linears in transformers' forward and in the
    lean decoder alike."""
    loaded = load_model(settings.model_copy(update={"gguf_int4": False}))
    assert loaded.info.decode_path == "lean"
    return loaded


def prefill(loaded: LoadedModel, texts: list[str]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prefill as the batched engine does it: (cache, next tokens, next positions, mask)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = [tokenizer.encode(text) for text in texts]
    longest = max(map(len, encoded))
    ids = torch.full((len(texts), longest), tokenizer.pad_token_id or 0)
    mask = torch.zeros((len(texts), longest), dtype=torch.long)
    positions = torch.zeros((len(texts), longest), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, longest - len(tokens) :] = torch.tensor(tokens)
        mask[row, longest - len(tokens) :] = 1
        positions[row, longest - len(tokens) :] = torch.arange(len(tokens))
    cache = new_cache(model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1).logits
    return cache, logits[:, -1].argmax(-1), mask.sum(1), mask


@pytest.mark.parametrize("texts", [PROMPTS, PROMPTS[:1]], ids=["padded batch", "one row"])
def test_decoder_steps_equal_transformers_forward_bit_for_bit(lean_model: LoadedModel, texts: list[str]) -> None:
    model = lean_model.model
    assert LeanForward.supports(model)
    decoder = LeanForward(model)
    with torch.inference_mode():
        cache, tokens, positions, mask = prefill(lean_model, texts)
        lean_cache = copy.deepcopy(cache)
        lean_tokens = tokens
        for _ in range(6):
            mask = torch.cat([mask, mask.new_ones((len(texts), 1))], dim=1)
            reference = model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=cache
            ).logits[:, -1]
            logits = decoder.step(lean_tokens, positions, mask, lean_cache)
            assert logits.dtype == reference.dtype and logits.shape == (len(texts), model.config.vocab_size)
            assert torch.equal(logits, reference)
            tokens, lean_tokens = reference.argmax(-1), logits.argmax(-1)
            positions = positions + 1
        for layer, lean_layer in zip(cache.layers, lean_cache.layers, strict=True):
            assert torch.equal(layer.keys, lean_layer.keys) and torch.equal(layer.values, lean_layer.values)


@pytest.mark.parametrize("long_prompt", [False, True], ids=["23 rows", "50 rows with filler"])
def test_a_mixed_pass_gives_each_part_what_it_gets_alone(lean_model: LoadedModel, long_prompt: bool) -> None:
    """Three decoding rows and two prompts in one pass vs each part in a pass of its own.

    Parts in passes that take the same kernels match bit for bit: oneDNN runs matmuls of up to 32 rows with one
    kernel and larger ones with another, which rounds differently. So up to 32 rows the parts must match bit for
    bit; above (3 + 8 + 39 rows, bucketed to 52 with filler rows), up to rounding, with the same greedy choices.
    """
    decoder = LeanForward(lean_model.model)
    config, tokenizer = lean_model.model.config, lean_model.tokenizer
    second = PROMPTS[2] + " " + PROMPTS[1] if long_prompt else "Sebutkan tiga pulau besar di Indonesia."
    newcomers = [torch.tensor(tokenizer.encode(text)) for text in ("Halo! Apa kabar?", second)]
    rows = 3 + sum(len(ids) for ids in newcomers)
    assert (rows > 32 and bucket_rows(rows) > rows) if long_prompt else rows <= 32
    with torch.inference_mode():
        cache, tokens, positions, mask = prefill(lean_model, PROMPTS)
        mask = torch.cat([mask, mask.new_ones((len(PROMPTS), 1))], dim=1)
        apart_cache, mixed_cache = copy.deepcopy(cache), copy.deepcopy(cache)
        alone = decoder.step(tokens, positions, mask, apart_cache)
        prompts_alone = torch.cat([decoder.forward(None, [PromptRow(ids, new_cache(config))])[1] for ids in newcomers])
        parts = [PromptRow(ids, new_cache(config)) for ids in newcomers]
        mixed, mixed_prompts = decoder.forward(DecodeRows(tokens, positions, mask, mixed_cache), parts)
    assert mixed is not None and mixed_prompts is not None and mixed_prompts.shape[0] == 2
    if long_prompt:
        torch.testing.assert_close(mixed, alone, atol=1.0, rtol=0.05)
        torch.testing.assert_close(mixed_prompts, prompts_alone, atol=1.0, rtol=0.05)
        assert torch.equal(mixed.argmax(-1), alone.argmax(-1))
        assert torch.equal(mixed_prompts.argmax(-1), prompts_alone.argmax(-1))
    else:
        assert torch.equal(mixed, alone) and torch.equal(mixed_prompts, prompts_alone)
    for part, ids in zip(parts, newcomers, strict=True):  # each prompt's cache holds exactly its own tokens
        assert all(layer.keys.shape == (1, 3, len(ids), 64) for layer in part.cache.layers)


def test_row_buckets_bound_the_matmul_shapes() -> None:
    sizes = {bucket_rows(count) for count in range(1, 4097)}
    assert all(bucket_rows(count) == count for count in range(1, 33))  # decoding steps keep their exact shapes
    assert all(count <= bucket_rows(count) < count * 1.125 for count in range(33, 4097))
    assert len(sizes) < 32 + 8 * 8  # ~8 sizes per power of two above 32


def test_decoder_applies_only_to_bf16_or_float32_llama_on_cpu(lean_model: LoadedModel) -> None:
    assert LeanForward.supports(lean_model.model)
    other = torch.float32 if lean_model.model.dtype == torch.bfloat16 else torch.bfloat16
    assert LeanForward.supports(copy.deepcopy(lean_model.model).to(other))
    assert not LeanForward.supports(copy.deepcopy(lean_model.model).to(torch.float16))
    assert not LeanForward.supports(object())
    with pytest.raises(ValueError, match="bf16 or float32 Llama"):
        LeanForward(copy.deepcopy(lean_model.model).to(torch.float16))


async def test_batched_engine_uses_it_unless_turned_off(settings: Settings, embedded_model: LoadedModel) -> None:
    """FAST_DECODE on (the default) and off: off runs transformers' forward.

    Requests one at a time get the same greedy texts on both, bit for bit: the model's forward routes a lone
    prompt's prefill and every decoding step to the native path, as the lean loop does. A concurrent batch runs on
    both, but off, prompts that arrive together are prefilled together, left-padded, by transformers' forward on the
    dequantised weights, so greedy texts may part after a while: only their start is compared.
    """
    requests = [
        GenerationRequest(messages=(Message("user", text),), max_new_tokens=10, temperature=0.0) for text in PROMPTS
    ]
    alone, together = {}, {}
    for fast in (True, False):
        chosen = settings.model_copy(update={"fast_decode": fast})
        engine = BatchedEngine(chosen, loader=lambda _settings: embedded_model)
        engine.load()
        try:
            assert (engine.lean_pass is not None) is fast
            alone[fast] = [(await engine.generate(request)).text for request in requests]
            together[fast] = [result.text for result in await asyncio.gather(*map(engine.generate, requests))]
            assert engine.runner.max_rows_seen >= 2
        finally:
            engine.close()
    assert all(alone[True]) and alone[True] == alone[False]
    for fast in (True, False):
        for text, reference in zip(together[fast], alone[True], strict=True):
            assert text.split()[:3] == reference.split()[:3]


async def test_a_failing_pass_fails_only_the_prompt_that_causes_it(
    settings: Settings, embedded_model: LoadedModel
) -> None:
    """A pass that fails after writing the running rows' cache is rolled back; the running request goes on unharmed.

    The fake runs the real pass first (so the running row's cache has grown) and then raises for one prompt: the
    engine must undo the append, run the running row alone, and fail only the newcomer that broke the pass.
    """
    batched = BatchedEngine(settings, loader=lambda _settings: embedded_model)
    batched.load()
    try:
        running = GenerationRequest(messages=(Message("user", PROMPTS[2]),), max_new_tokens=24, temperature=0.0)
        breaking = GenerationRequest(messages=(Message("user", "BOOM please"),), max_new_tokens=4, temperature=0.0)
        breaking_ids = batched.prepare(breaking)
        real_forward = batched.lean_pass.forward
        failed_passes: list[int] = []

        misaligned: list[tuple[int, int]] = []

        def forward(decode: DecodeRows | None, prompts: list[PromptRow]) -> Any:
            if decode is not None:  # the cache must hold exactly the mask's columns before the new token's
                misaligned.extend(
                    (layer.keys.shape[-2], decode.mask.shape[1] - 1)
                    for layer in decode.cache.layers
                    if layer.keys.shape[-2] != decode.mask.shape[1] - 1
                )
            result = real_forward(decode, prompts)
            if any(prompt.ids.tolist() == breaking_ids for prompt in prompts):
                failed_passes.append(0 if decode is None else int(decode.tokens.shape[0]))
                raise RuntimeError("exploded")
            return result

        batched.lean_pass.forward = forward
        stream = await batched.submit(running)
        first = await anext(stream)  # the running request has started generating alone
        assert isinstance(first, TextDelta)
        with pytest.raises(GenerationFailed, match="generation failed: RuntimeError"):
            await batched.generate(breaking)
        deltas, result = await collect(stream)
        assert failed_passes == [1, 0]  # the mixed pass, then the newcomer alone
        assert not misaligned  # the failed pass's append was undone
        assert first.text + "".join(deltas) == result.text
        # A lone greedy request gets the same bits on both engines: had the failed pass's append stayed in its
        # cache, the text would differ from the sequential engine's.
        sequential = SequentialEngine(settings, loader=lambda _settings: embedded_model)
        sequential.load()
        try:
            assert result.text == (await sequential.generate(running)).text
        finally:
            sequential.close()
        assert result.output_length == 24
        assert (await batched.generate(greedy_request("Halo!"))).text  # and the engine keeps serving
    finally:
        batched.close()


def greedy_request(text: str, max_new_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(messages=(Message("user", text),), max_new_tokens=max_new_tokens, temperature=0.0)


def test_a_prompt_prefilled_in_chunks_matches_it_prefilled_whole(lean_model: LoadedModel) -> None:
    decoder = LeanForward(lean_model.model)
    config = lean_model.model.config
    ids = torch.tensor(lean_model.tokenizer.encode(PROMPTS[2] + " " + PROMPTS[1] + " " + PROMPTS[0]))
    with torch.inference_mode():
        _, whole = decoder.forward(None, [PromptRow(ids, new_cache(config))])
        cache = new_cache(config)
        for start, end in ((0, 9), (9, 30), (30, None)):
            _, last = decoder.forward(None, [PromptRow(ids, cache, start, end)])
        with pytest.raises(ValueError, match="bad prompt chunk"):
            decoder.forward(None, [PromptRow(ids, new_cache(config), 5, 5)])
    assert whole is not None and last is not None
    assert all(layer.keys.shape[-2] == len(ids) for layer in cache.layers)
    # Other matmul shapes and masks round differently; a wrong mask or position would be far off.
    torch.testing.assert_close(last, whole, atol=1.0, rtol=0.05)
    assert torch.equal(last.argmax(-1), whole.argmax(-1))


async def test_a_long_prompt_is_prefilled_over_passes_while_others_stream(
    settings: Settings, embedded_model: LoadedModel
) -> None:
    """With a 16-token pass budget a ~60-token prompt takes several passes, each also advancing the running row."""
    batched = BatchedEngine(settings, loader=lambda _settings: embedded_model)
    batched.load()
    try:
        batched.runner.pass_prompt_tokens = 16
        long_request = GenerationRequest(
            messages=(Message("user", PROMPTS[2] + " " + PROMPTS[1]),), max_new_tokens=6, temperature=0.0
        )
        long_ids = batched.prepare(long_request)
        real_forward = batched.lean_pass.forward
        chunks_seen: list[tuple[int, int, int]] = []  # (start, end, running rows) of the long prompt's chunks

        def forward(decode: DecodeRows | None, prompts: list[PromptRow]) -> Any:
            for prompt in prompts:
                if prompt.ids.tolist() == long_ids:
                    chunks_seen.append((*prompt.span(), 0 if decode is None else int(decode.tokens.shape[0])))
            return real_forward(decode, prompts)

        batched.lean_pass.forward = forward
        running = await batched.submit(greedy_request("Tell me a story.", max_new_tokens=40))  # runs past 40
        assert isinstance(await anext(running), TextDelta)
        result = await batched.generate(long_request)
        _, running_result = await collect(running)
        ends = [end for _, end, _ in chunks_seen]
        # the first chunk starts after the prefix a recent prompt shared (the chat template: PREFIX_CACHE_TOKENS)
        first = chunks_seen[0][0]
        assert batched.runner.prefixes is not None and 0 < first == batched.runner.prefixes.hit_tokens
        assert [start for start, _, _ in chunks_seen] == [first, *ends[:-1]] and ends[-1] == len(long_ids)
        assert len(chunks_seen) >= (len(long_ids) - first) // 16
        assert all(end - start <= 16 for start, end, _ in chunks_seen)
        assert all(rows == 1 for _, _, rows in chunks_seen)  # the running request got a token in every pass
        assert result.output_length > 0 and result.text
        assert running_result.output_length == 40
        batched.runner.pass_prompt_tokens = 4096
        assert (await batched.generate(long_request)).text == result.text  # the same text prefilled whole
    finally:
        batched.close()


def test_passes_take_the_shortest_remaining_prompts_first_up_to_the_budget(settings: Settings) -> None:
    from inference.engines.batched.runner import Slot

    engine = BatchedEngine(settings)  # never loaded: only the planning is exercised
    engine.runner.pass_prompt_tokens = 40
    slots = [Slot(greedy_request(str(n)), list(range(n)), None, None, 0.0) for n in (30, 10, 50)]  # type: ignore[arg-type]
    engine.runner.prefilling = list(slots)
    assert engine.runner.plan_prompt_chunks() == [(slots[1], 10), (slots[0], 30)]
    slots[2].prefilled = 45  # 5 left: now the shortest remaining; 30 no longer fits whole, so it waits
    assert engine.runner.plan_prompt_chunks() == [(slots[2], 50), (slots[1], 10)]
    slots[1].cancelled = True  # a cancelled prompt is dropped (and its row freed) before the next pass
    engine._active = 3
    assert engine.runner.plan_prompt_chunks() == [(slots[2], 50), (slots[0], 30)]
    assert slots[1] not in engine.runner.prefilling and engine._active == 2
    engine.runner.pass_prompt_tokens = 20
    assert engine.runner.plan_prompt_chunks() == [(slots[2], 50)]  # no chunk rides along with a completing prompt
    engine.runner.prefilling = [slots[0]]
    assert engine.runner.plan_prompt_chunks() == [(slots[0], 20)]  # alone, a long prompt is split
    slots[0].prefilled = 20
    assert engine.runner.plan_prompt_chunks() == [(slots[0], 30)]
