"""The native path (inference/cpu/native_forward.py, inference/cpu/native/forward.c) on the real embedded model.

It serves every forward pass of the embedded model on every x86-64 CPU with AVX2 and a C compiler, in the model's
dtype (bf16 where bf16 matmuls are native, else float32): the batched engine's lean loop runs its passes (decoding
rows and prompt chunks together) through it, and the model's own forward routes plain decoding steps and single-row
prefills to it (the sequential engine's `generate`, the batched engine with FAST_DECODE=false).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pytest
import torch

from inference import GenerationRequest, Message
from inference.cpu.gguf_blocks import q4_1_blocks, q4_1_codes, q8_0_head
from inference.cpu.native_build import NativeBuildError, build_library
from inference.cpu.native_forward import NativeForward, attach, interleave, native_forward_of
from inference.cpu.passes import DecodeRows, PromptRow
from inference.cpu.paths import cpu_flags, isa_in_force, native_possible
from inference.engines.batched.kv_cache import new_cache
from inference.model.loading import LoadedModel, embedded_gguf_path, load_model
from tests.helpers import engine_for
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write one sentence about the sea.",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
]


@pytest.fixture(scope="module")
def served(settings: Settings, embedded_model: LoadedModel) -> LoadedModel:
    # Every CI machine is x86-64 with AVX2 and a C compiler: there the native path must serve (no skip). Where it
    # cannot, test_without_a_compiler_the_fallback_serves below checks the path that serves instead.
    assert native_possible(settings.cpu_isa) is None, native_possible(settings.cpu_isa)
    return embedded_model


def chat_ids(loaded: LoadedModel, text: str) -> torch.Tensor:
    chat = [{"role": "user", "content": text}]
    return torch.tensor(
        loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


def prefilled(loaded: LoadedModel, text: str) -> tuple[Any, int, int]:
    """A cache holding `text` as a user's chat turn, natively prefilled: (cache, next token, position)."""
    ids = chat_ids(loaded, text)
    cache = new_cache(loaded.model.config)
    step = native_forward_of(loaded.model)
    assert step is not None
    with torch.inference_mode():
        _, logits = step.forward(None, [PromptRow(ids, cache)])
    assert logits is not None
    return cache, int(logits[0].argmax()), len(ids)


def transformers_forward(model: Any, **kwargs: Any) -> Any:
    """The model's forward as transformers wrote it (the class the native path's routing class derives from)."""
    return type(model).__mro__[1].forward(model, **kwargs)


def test_the_served_model_has_it_and_says_so(settings: Settings, served: LoadedModel) -> None:
    step = native_forward_of(served.model)
    assert step is not None and step.native_head  # the head's Q8_0 blocks are the tied embedding
    assert served.info.decode_path == "native" and served.path is not None and served.path.name == "native"
    assert served.info.cpu_isa == isa_in_force(settings.cpu_isa)
    assert served.info.quantization.startswith("Q4_1 GGUF (native forward passes")
    assert type(served.model).__name__ == "NativeLlamaForCausalLM"  # the routing class says what it is
    assert 80e6 < step.nbytes < 110e6  # the layers' Q4_1 blocks (~66 MB) and the head's Q8_0 ones (~30 MB)
    # the model's dtype follows the CPU (CPU_ISA): bf16 only where bf16 matmuls are native; the caches follow it
    native_bf16 = isa_in_force(settings.cpu_isa) in ("amx", "avx512-bf16")
    assert served.model.dtype == (torch.bfloat16 if native_bf16 else torch.float32) == step.dtype


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


def test_its_logits_follow_the_dequantised_model(served: LoadedModel) -> None:
    """Teacher-forced over a prompt and a reply: the 4-bit pass's logits track transformers' forward on the
    dequantised weights (llama.cpp's arithmetic on the GGUF's blocks vs their bf16/float32 dequantisation): the same
    top token nearly always, close values. A wrong nibble, row order, scale or causal mask gives noise.
    (Measured, 41 prompt + 32 reply positions, bf16: top-1 agreement 96 %, mean KL 0.006 nats, cosine mean 0.998,
    min 0.92.)"""
    model = served.model
    step = native_forward_of(model)
    assert step is not None
    ids = chat_ids(served, PROMPTS[2])
    with torch.inference_mode():
        reference = transformers_forward(model, input_ids=ids[None], use_cache=False).logits[0].float()
        reply = reference[-1].argmax()
        cache = new_cache(model.config)
        outputs = []
        for position in range(len(ids)):  # the prompt one token per pass, then 32 tokens of the reference's reply
            outputs.append(step.forward(None, [PromptRow(ids, cache, position, position + 1)])[1][0])
        tokens = [int(reply)]
        for _ in range(31):
            whole = torch.cat([ids, torch.tensor(tokens)])
            position = len(whole) - 1
            native = step.logits(whole[-1:], torch.tensor([position]), [0], cache)[0]
            exact = transformers_forward(model, input_ids=whole[None], use_cache=False, logits_to_keep=1).logits
            outputs.append(native)
            reference = torch.cat([reference, exact[0].float()])
            tokens.append(int(exact[0, -1].argmax()))
    native_logits = torch.stack(outputs)
    agree = (native_logits.argmax(-1) == reference.argmax(-1)).float().mean()
    expected = reference.log_softmax(-1)
    divergence = (expected.exp() * (expected - native_logits.log_softmax(-1))).sum(-1).mean()
    assert agree >= 0.8 and divergence < 0.05, (agree, divergence)
    similarity = torch.nn.functional.cosine_similarity(native_logits, reference, dim=-1)
    assert similarity.mean() > 0.99 and similarity.min() > 0.9, similarity


def test_a_token_gets_the_same_bits_whatever_its_pass_carries(served: LoadedModel) -> None:
    """A prompt prefilled whole, in chunks, or in one pass with decoding rows and another prompt: the same logits
    and cache, bit for bit (every token's arithmetic is its own), so a reply does not depend on its batch."""
    step = native_forward_of(served.model)
    assert step is not None
    config = served.model.config
    ids, other = chat_ids(served, PROMPTS[2]), chat_ids(served, PROMPTS[0])
    with torch.inference_mode():
        whole = new_cache(config)
        _, expected = step.forward(None, [PromptRow(ids, whole)])
        chunked = new_cache(config)
        for start, end in ((0, 7), (7, 20), (20, len(ids))):
            _, last = step.forward(None, [PromptRow(ids, chunked, start, end)])
        running, token, position = prefilled(served, PROMPTS[1])
        alone_running = copy.deepcopy(running)
        mixed = new_cache(config)
        mask = torch.ones((1, position + 1), dtype=torch.long)
        decode = DecodeRows(torch.tensor([token]), torch.tensor([position]), mask, running)
        decoded, prompts = step.forward(decode, [PromptRow(other, new_cache(config)), PromptRow(ids, mixed)])
        alone = step.logits(torch.tensor([token]), torch.tensor([position]), [0], alone_running)
    assert expected is not None and prompts is not None and decoded is not None
    assert torch.equal(last, expected) and torch.equal(prompts[1:], expected)
    assert torch.equal(decoded, alone)
    keys = whole.layers[3].keys
    assert keys.dtype == step.dtype  # the cache is in the model's dtype, float32 kept to full precision there
    assert step.dtype == torch.bfloat16 or not torch.equal(keys, keys.to(torch.bfloat16).float())
    for layer in range(len(whole.layers)):
        assert torch.equal(chunked.layers[layer].keys, whole.layers[layer].keys)
        assert torch.equal(mixed.layers[layer].values, whole.layers[layer].values)
        assert torch.equal(running.layers[layer].keys, alone_running.layers[layer].keys)


def test_rows_of_a_padded_batch_get_what_they_get_alone(served: LoadedModel) -> None:
    """Three rows of different lengths, right-aligned in one cache with left padding: each row's logits and new
    cache column are bit for bit what it gets in a pass of its own (every row is computed on its own)."""
    step = native_forward_of(served.model)
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
    """The CPU_ISA=avx2 build (-march=x86-64-v3: AVX2's dot products, the head's signed codes another way, as the
    VNNI form would overflow there) and this CPU's own build (-march=native; on an AVX2-only CPU the same kernels):
    integer sums either way, so the logits must be the same bits."""
    gguf = embedded_gguf_path()
    avx2 = NativeForward(
        build_library(tmp_path, "avx2"), served.model, q4_1_blocks(served.model, gguf), q8_0_head(served.model, gguf)
    )
    step = native_forward_of(served.model)
    assert step is not None
    cache, token, position = prefilled(served, PROMPTS[1])
    other = copy.deepcopy(cache)
    ids = chat_ids(served, PROMPTS[0])
    with torch.inference_mode():
        for _ in range(3):
            tokens, positions = torch.tensor([token]), torch.tensor([position])
            expected = step.logits(tokens, positions, [0], cache)
            assert torch.equal(avx2.logits(tokens, positions, [0], other), expected)
            token, position = int(expected[0].argmax()), position + 1
        mine, theirs = new_cache(served.model.config), new_cache(served.model.config)
        assert torch.equal(
            avx2.forward(None, [PromptRow(ids, theirs)])[1], step.forward(None, [PromptRow(ids, mine)])[1]
        )


def test_bad_arguments_are_refused_not_read_out_of_bounds(served: LoadedModel) -> None:
    step = native_forward_of(served.model)
    assert step is not None
    cache, token, position = prefilled(served, PROMPTS[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step.logits(torch.tensor([10**6]), torch.tensor([position]), [0], cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step.forward(None, [PromptRow(torch.tensor([1, -5, 2]), new_cache(served.model.config))])
    with pytest.raises(ValueError, match="1 or more rows"):
        step.logits(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [], cache)
    with pytest.raises(ValueError, match="not the chunk's start"):  # a chunk that does not continue its cache
        step.forward(None, [PromptRow(torch.arange(50), cache, 3, 9)])
    assert cache.get_seq_length() == position  # nothing was appended
    assert step.logits(torch.tensor([token]), torch.tensor([position]), [0], cache).shape[0] == 1


async def test_the_sequential_engine_runs_every_pass_through_it(settings: Settings, served: LoadedModel) -> None:
    """`generate`'s prefill and its one-token steps go to the native path (the model's forward routes them): a
    request of n tokens makes one native prefill of the whole prompt and n - 1 one-token passes."""
    step = native_forward_of(served.model)
    assert step is not None
    calls: list[tuple[int, int]] = []
    real = step._forward

    def counted(decode: Any, prompts: Any, starts: Any) -> Any:
        calls.append((0 if decode is None else int(decode.tokens.shape[0]), len(prompts)))
        return real(decode, prompts, starts)

    step._forward = counted  # type: ignore[method-assign]
    engine = engine_for(settings, served, "sequential")
    try:
        request = GenerationRequest(messages=(Message("user", PROMPTS[1]),), max_new_tokens=6, temperature=0.0)
        result = await engine.generate(request)
    finally:
        del step._forward
        engine.close()
    assert result.output_length == 6 and calls == [(0, 1)] + [(1, 0)] * 5


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
    assert native_forward_of(model) is None
    gguf = embedded_gguf_path()
    step = attach(model, q4_1_blocks(model, gguf), q8_0_head(model, gguf), None)
    assert isinstance(step, NativeForward) and native_forward_of(model) is step
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight.mul_(2.0)
    assert native_forward_of(model) is None  # and the model's forward runs transformers' code again
    ids = torch.tensor([served.tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        before = copy.deepcopy(out.cache)
        next_out = model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True)
        expected = transformers_forward(model, input_ids=ids[:, -1:], cache=before)
    assert next_out.logits.dtype == model.dtype  # transformers' head, not the native one (float32 logits)
    assert torch.equal(next_out.logits, expected.logits)  # transformers' own forward, bit for bit


@pytest.mark.parametrize("why", ["no compiler", "not x86-64", "no AVX2"])
async def test_without_the_native_path_the_fallback_serves(
    settings: Settings, why: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    """Where the native path cannot be built (no C compiler; aarch64; an x86-64 CPU without AVX2) the path in force
    says so and why, and the lean torch path serves: float32 (or bf16 where native) on prepacked weights."""
    import inference.cpu.paths as cpu_path

    if why == "no compiler":
        monkeypatch.setenv("CC", "/bin/false")
        with pytest.raises(NativeBuildError, match="compiler failed"):
            build_library(tmp_path)
        monkeypatch.setattr(cpu_path, "c_compiler", lambda: None)
    elif why == "not x86-64":
        monkeypatch.setattr(cpu_path.platform, "machine", lambda: "aarch64")
    else:
        monkeypatch.setattr(cpu_path, "cpu_flags", lambda: frozenset(cpu_flags() - {"avx2"}))
    with caplog.at_level(logging.INFO, logger="inference.model.loading"):
        loaded = load_model(settings)
    assert native_forward_of(loaded.model) is None and loaded.info.decode_path == "lean"
    assert loaded.path is not None and "native path off" in loaded.path.reason
    assert "path=lean" in caplog.text
    engine = engine_for(settings, loaded, "batched")
    try:
        assert type(engine.lean_pass).__name__ == "LeanForward"
        request = GenerationRequest(messages=(Message("user", PROMPTS[0]),), max_new_tokens=8, temperature=0.0)
        result = await engine.generate(request)
    finally:
        engine.close()
    assert result.output_length == 8 and result.text.strip()


async def test_a_prompt_starts_from_the_prefix_a_recent_prompt_shared_and_gets_the_same_reply(
    settings: Settings, served: LoadedModel, shared_engines: dict[str, Any]
) -> None:
    """PREFIX_CACHE_TOKENS (native path): the chat template and system message, computed once, start the next
    prompts' caches, and a longer prompt reuses an earlier one's start; the replies are those of a full prefill, bit
    for bit (the sequential engine's, which has no prefix cache)."""

    def shared(a: list[int], b: list[int]) -> int:
        count = 0
        for x, y in zip(a, b[:-1], strict=False):  # never the whole new prompt: its last token gives the logits
            if x != y:
                break
            count += 1
        return count

    engine = engine_for(settings, served, "batched")
    try:
        prefixes = engine.runner.prefixes
        assert prefixes is not None and len(prefixes) == 0
        requests = [
            GenerationRequest(messages=(Message("user", text),), max_new_tokens=16, temperature=0.0)
            for text in (PROMPTS[0], PROMPTS[1], PROMPTS[1] + " Singkat saja.")
        ]
        ids = [engine.prepare(request) for request in requests]
        replies = [await engine.generate(request) for request in requests]
        expected = shared(ids[0], ids[1]) + max(shared(ids[0], ids[2]), shared(ids[1], ids[2]))
        assert shared(ids[0], ids[1]) >= 8 and shared(ids[1], ids[2]) > shared(ids[0], ids[1])
        assert prefixes.hit_tokens == expected and len(prefixes) == 3
    finally:
        engine.close()
    for request, reply in zip(requests, replies, strict=True):
        alone = await shared_engines["sequential"].generate(request)
        assert reply.text == alone.text and reply.output_length == alone.output_length


def test_the_prefix_cache_keeps_its_budget_and_never_hands_out_a_whole_prompt(served: LoadedModel) -> None:
    from inference.engines.batched.prefix_cache import PrefixCache

    step = native_forward_of(served.model)
    assert step is not None
    config = served.model.config
    ids = chat_ids(served, PROMPTS[2])
    cache = new_cache(config)
    with torch.inference_mode():
        step.forward(None, [PromptRow(ids, cache)])
    prefixes = PrefixCache(budget_tokens=2 * len(ids) - 1)
    prefixes.store(ids.tolist(), cache)
    again = new_cache(config)
    assert prefixes.take(ids.tolist(), again) == len(ids) - 1  # the same prompt: all but its last token
    assert torch.equal(again.layers[7].keys, cache.layers[7].keys[:, :, : len(ids) - 1])
    assert prefixes.take(ids[:5].tolist(), new_cache(config)) == 0  # too short to be worth it
    prefixes.store(ids.tolist(), cache)  # a second copy goes past the budget: the older one is evicted
    assert len(prefixes) == 1
