"""The lean Llama decoder (inference/fast_decode.py) vs transformers' forward, on the real embedded model in bf16."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch

from inference import BatchedEngine, GenerationRequest, Message
from inference.batching import new_cache
from inference.fast_decode import LlamaDecoder
from inference.loading import LoadedModel
from inference.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write one sentence about the sea.",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
]


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
def test_decoder_steps_equal_transformers_forward_bit_for_bit(embedded_model: LoadedModel, texts: list[str]) -> None:
    model = embedded_model.model
    assert LlamaDecoder.supports(model)
    decoder = LlamaDecoder(model)
    with torch.inference_mode():
        cache, tokens, positions, mask = prefill(embedded_model, texts)
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


def test_decoder_applies_only_to_bf16_llama_on_cpu(embedded_model: LoadedModel) -> None:
    assert LlamaDecoder.supports(embedded_model.model)
    assert not LlamaDecoder.supports(copy.deepcopy(embedded_model.model).to(torch.float32))
    assert not LlamaDecoder.supports(object())
    with pytest.raises(ValueError, match="bf16 Llama"):
        LlamaDecoder(copy.deepcopy(embedded_model.model).to(torch.float32))


async def test_batched_engine_uses_it_unless_turned_off(settings: Settings, embedded_model: LoadedModel) -> None:
    """FAST_DECODE on (the default) and off give the same greedy texts for a batch; off runs transformers' forward."""

    async def texts(engine: BatchedEngine) -> list[str]:
        requests = [
            GenerationRequest(messages=(Message("user", text),), max_new_tokens=10, temperature=0.0) for text in PROMPTS
        ]
        return [result.text for result in await asyncio.gather(*map(engine.generate, requests))]

    results = {}
    for fast in (True, False):
        chosen = settings.model_copy(update={"fast_decode": fast})
        engine = BatchedEngine(chosen, loader=lambda _settings: embedded_model)
        engine.load()
        try:
            assert (engine._decoder is not None) is fast
            results[fast] = await texts(engine)
            assert engine.max_rows_seen >= 2
        finally:
            engine.close()
    assert all(results[True]) and results[True] == results[False]
