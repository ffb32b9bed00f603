"""The native decoding step (inference/native_step.py, inference/native/decode_step.c) on the real embedded model.

It serves every decoding pass of up to MAX_ROWS rows of the embedded model, on both engines: the batched engine's
lean decoder calls it, and the model's own forward routes one-token steps to it (the sequential engine's
`generate`, the batched engine with FAST_DECODE=false).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference import GenerationRequest, Message
from inference.fast_decode import LlamaDecoder, PromptRow
from inference.gguf_int4 import q4_1_blocks, q4_1_codes, q8_0_head
from inference.kv_cache import new_cache
from inference.loading import LoadedModel, embedded_gguf_path, load_model
from inference.native_step import MAX_ROWS, NativeStep, build_library, install, interleave, native_step
from tests.conftest import engine_for
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write one sentence about the sea.",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
]


@pytest.fixture(scope="module")
def served(embedded_model: LoadedModel) -> LoadedModel:
    if native_step(embedded_model.model) is None:
        pytest.skip("no native step on this machine (no C compiler, not x86-64, or a float32 model)")
    return embedded_model


def prefilled(loaded: LoadedModel, text: str) -> tuple[Any, int, int]:
    """A cache holding `text` as a user's chat turn (the lean decoder's bf16 prefill): (cache, next token, position)."""
    chat = [{"role": "user", "content": text}]
    ids = torch.tensor(
        loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    cache = new_cache(loaded.model.config)
    with torch.inference_mode():
        _, logits = LlamaDecoder(loaded.model, int4=False).forward(None, [PromptRow(ids, cache)])
    assert logits is not None
    return cache, int(logits[0].argmax()), len(ids)


def test_the_served_model_has_it_and_says_so(served: LoadedModel) -> None:
    step = native_step(served.model)
    assert step is not None and step.native_head  # the head's Q8_0 blocks are the tied embedding
    assert served.info.quantization.startswith("Q4_1 GGUF (native step for up to 32 decoding rows, Q8_0 head")
    assert 80e6 < step.nbytes < 110e6  # the layers' Q4_1 blocks (~66 MB) and the head's Q8_0 ones (~30 MB)


def test_interleave_moves_every_code_where_the_kernel_reads_it() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(16, 2 * 20), dtype=np.uint8)  # 16 rows, 2 blocks of 32 inputs
    grouped = interleave(raw).reshape(2, 2, 160)  # (groups, blocks, bytes)
    codes, _, _ = q4_1_codes(raw, 64)
    for row in range(16):
        group, j = divmod(row, 8)
        for block in range(2):
            part = grouped[group, block]
            assert bytes(part[2 * j : 2 * j + 2]) == bytes(raw[row, block * 20 : block * 20 + 2])  # d
            assert bytes(part[16 + 2 * j : 18 + 2 * j]) == bytes(raw[row, block * 20 + 2 : block * 20 + 4])  # m
            for e in range(32):
                c, rest = divmod(e, 8)
                high, i = divmod(rest, 4)
                byte = part[32 + 32 * c + 4 * j + i]
                assert (byte >> 4 if high else byte & 0x0F) == codes[row, block * 32 + e]


def test_its_logits_follow_the_bf16_model(served: LoadedModel) -> None:
    """Teacher-forced over a reply: the 4-bit step's logits track the bf16 weights' (llama.cpp's arithmetic on the
    GGUF's blocks vs their bf16 dequantisation): the same top token nearly always, close values. A wrong nibble,
    row order or scale gives noise. (Measured over 4 chat prompts x 48 tokens: top-1 99.0 %, mean KL 0.003 nats;
    torch's int4 kernel on the same blocks with bf16 activations: 97.4 %, 0.0013.)"""
    model = served.model
    step = native_step(model)
    assert step is not None
    reference = LlamaDecoder(model, int4=False)
    cache, token, position = prefilled(served, PROMPTS[2])
    bf16_cache = copy.deepcopy(cache)
    agree, steps, divergence = 0, 32, 0.0
    with torch.inference_mode():
        for _ in range(steps):
            tokens, positions = torch.tensor([token]), torch.tensor([position])
            native = step.logits(tokens, positions, [0], cache)[0]
            mask = torch.ones((1, position + 1), dtype=torch.long)
            exact = reference.step(tokens, positions, mask, bf16_cache)[0].float()
            agree += int(native.argmax() == exact.argmax())
            expected = exact.log_softmax(0)
            divergence += float((expected.exp() * (expected - native.log_softmax(0))).sum())
            assert torch.nn.functional.cosine_similarity(native, exact, dim=0) > 0.99
            token, position = int(exact.argmax()), position + 1
    assert agree >= 0.8 * steps and divergence / steps < 0.02
    for layer, bf16_layer in zip(cache.layers, bf16_cache.layers, strict=True):
        assert layer.keys.shape == bf16_layer.keys.shape
        torch.testing.assert_close(layer.keys.float(), bf16_layer.keys.float(), atol=0.5, rtol=0.1)


def test_rows_of_a_padded_batch_get_what_they_get_alone(served: LoadedModel) -> None:
    """Three rows of different lengths, right-aligned in one cache with left padding: each row's logits and new
    cache column are bit for bit what it gets in a pass of its own (every row is computed on its own)."""
    step = native_step(served.model)
    assert step is not None
    parts = [prefilled(served, text) for text in PROMPTS]
    longest = max(position for _, _, position in parts)
    batch = new_cache(served.model.config)
    for index, layer in enumerate(batch.layers):
        keys = [torch.nn.functional.pad(c.layers[index].keys, (0, 0, longest - p, 0)) for c, _, p in parts]
        values = [torch.nn.functional.pad(c.layers[index].values, (0, 0, longest - p, 0)) for c, _, p in parts]
        layer.lazy_initialization(keys[0], values[0])
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
    tokens = torch.tensor([token for _, token, _ in parts])
    positions = torch.tensor([position for _, _, position in parts])
    starts = [longest - position for _, _, position in parts]
    with torch.inference_mode():
        together = step.logits(tokens, positions, starts, batch)
        for row, (cache, token, position) in enumerate(parts):
            alone = step.logits(torch.tensor([token]), torch.tensor([position]), [0], cache)
            assert torch.equal(together[row], alone[0]), row
            assert torch.equal(batch.layers[5].keys[row, :, -1], cache.layers[5].keys[0, :, -1])


def test_the_avx2_build_gives_the_same_bits_as_this_cpus(served: LoadedModel, tmp_path: Any) -> None:
    """Without AVX-512 VNNI the kernels take AVX2's dot products (the head's signed codes another way: the VNNI form
    would overflow there). Integer sums either way, so the logits must be the same bits as this CPU's build."""
    if "avx512_vnni" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU builds the AVX2 kernels already")
    library = build_library(tmp_path, extra_flags=["-mno-avx512vnni", "-mno-avxvnni"])
    assert library is not None
    gguf = embedded_gguf_path()
    avx2 = NativeStep(library, served.model, q4_1_blocks(served.model, gguf), q8_0_head(served.model, gguf))
    step = native_step(served.model)
    assert step is not None
    cache, token, position = prefilled(served, PROMPTS[1])
    other = copy.deepcopy(cache)
    with torch.inference_mode():
        for _ in range(3):
            tokens, positions = torch.tensor([token]), torch.tensor([position])
            expected = step.logits(tokens, positions, [0], cache)
            assert torch.equal(avx2.logits(tokens, positions, [0], other), expected)
            token, position = int(expected[0].argmax()), position + 1


def test_bad_arguments_are_refused_not_read_out_of_bounds(served: LoadedModel) -> None:
    step = native_step(served.model)
    assert step is not None
    cache, token, position = prefilled(served, PROMPTS[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step.logits(torch.tensor([10**6]), torch.tensor([position]), [0], cache)
    with pytest.raises(ValueError, match="1 to 32 rows"):
        step.logits(
            torch.zeros(MAX_ROWS + 1, dtype=torch.long), torch.zeros(MAX_ROWS + 1, dtype=torch.long), [0], cache
        )
    assert cache.get_seq_length() == position  # nothing was appended
    assert step.logits(torch.tensor([token]), torch.tensor([position]), [0], cache).shape[0] == 1


async def test_the_sequential_engine_decodes_through_it(settings: Settings, served: LoadedModel) -> None:
    """`generate`'s one-token steps go to the native step (the model's forward routes them): a request of n tokens
    makes n - 1 native calls (the first token comes from the prefill)."""
    step = native_step(served.model)
    assert step is not None
    calls = []
    real = step._logits

    def counted(*args: Any) -> Any:
        calls.append(args[0])
        return real(*args)

    step._logits = counted  # type: ignore[method-assign]
    engine = engine_for(settings, served, "sequential")
    try:
        request = GenerationRequest(messages=(Message("user", PROMPTS[1]),), max_new_tokens=6, temperature=0.0)
        result = await engine.generate(request)
    finally:
        del step._logits
        engine.close()
    assert result.output_length == 6 and calls == [1] * 5


async def test_a_lone_greedy_request_gives_the_same_text_on_both_engines(
    served: LoadedModel, shared_engines: dict[str, Any]
) -> None:
    for text in [*PROMPTS, "Tell me a story."]:
        request = GenerationRequest(messages=(Message("user", text),), max_new_tokens=48, temperature=0.0)
        alone = await shared_engines["sequential"].generate(request)
        batched = await shared_engines["batched"].generate(request)
        assert batched.text == alone.text and batched.output_length == alone.output_length, text


def test_changed_weights_turn_it_off(served: LoadedModel) -> None:
    model = copy.deepcopy(served.model)  # a copy has no native step of its own: give it one
    assert native_step(model) is None
    gguf = embedded_gguf_path()
    step = install(model, q4_1_blocks(model, gguf), q8_0_head(model, gguf), None)
    assert isinstance(step, NativeStep) and native_step(model) is step
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.mul_(2.0)
    assert native_step(model) is None  # and the model's forward runs transformers' code again
    ids = torch.tensor([served.tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        next_out = model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True)
    assert next_out.logits.dtype == torch.bfloat16  # transformers' head, not the native one (float32)


def test_without_a_compiler_torch_int4_serves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    with caplog.at_level(logging.WARNING, logger="inference.native_step"):
        assert build_library(tmp_path) is None
    assert "native decoding step" in caplog.text
    loaded = load_model(settings)
    assert native_step(loaded.model) is None
    assert loaded.info.quantization.startswith("Q4_1 GGUF (int4 for passes under 8 rows")
