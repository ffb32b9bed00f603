"""The GGUF's own Q4_1 blocks as int4 copies of the embedded model's linears (inference/gguf_int4.py, GGUF_INT4).

Where the native step cannot be built (NATIVE_DECODE=false here), passes of fewer than INT4_BELOW_ROWS rows multiply
by them, on both engines; larger passes by the bf16 weights. The native step itself: tests/test_native_step.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from inference import BatchedEngine, GenerationRequest, Message, SequentialEngine
from inference.cpu_kernels import INT4_BELOW_ROWS, PackedLinear, int4_weight, linear_pointwise, packed_weight
from inference.gguf_int4 import gguf_tensors, llama_rows, q4_1_blocks, q4_1_codes
from inference.loading import LoadedModel, embedded_gguf_path, load_model
from tests.conftest import engine_for
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write one sentence about the sea.",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
    "Tell me a story.",
]


@pytest.fixture(scope="module")
def bf16_model(settings: Settings, embedded_model: LoadedModel) -> LoadedModel:
    """The embedded model served by torch's int4 kernel (the path without the native step)."""
    if embedded_model.model.dtype != torch.bfloat16:
        pytest.skip("this CPU runs the embedded model in float32: the int4 path is bf16 only")
    return load_model(settings.model_copy(update={"native_decode": False}))


def linears(loaded: LoadedModel) -> list[torch.nn.Module]:
    return [m for m in loaded.model.modules() if isinstance(m, PackedLinear) and m is not loaded.model.lm_head]


def test_the_tensor_index_reads_what_the_gguf_library_reads() -> None:
    from gguf import GGUFReader

    reference = GGUFReader(str(embedded_gguf_path())).tensors
    ours = gguf_tensors(embedded_gguf_path())
    assert [t.name for t in ours] == [t.name for t in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.kind == int(theirs.tensor_type) and mine.shape == tuple(int(d) for d in theirs.shape)
        assert np.array_equal(mine.data.reshape(-1).view(np.uint8), np.asarray(theirs.data).reshape(-1).view(np.uint8))


def test_q4_1_codes_dequantise_to_what_ggml_computes() -> None:
    # One block by hand: d = 0.5, m = -1.0, code j in the low nibble of byte j, code j + 16 in its high nibble.
    codes = np.arange(32) % 16
    block = np.concatenate(
        [
            np.array([0.5], dtype=np.float16).view(np.uint8),
            np.array([-1.0], dtype=np.float16).view(np.uint8),
            (codes[:16] | (codes[16:] << 4)).astype(np.uint8),
        ]
    )
    got, d, m = q4_1_codes(block[None, :], 32)
    assert np.array_equal(got[0], codes) and d[0, 0] == 0.5 and m[0, 0] == -1.0
    assert list(llama_rows(8, 2)) == [0, 2, 1, 3, 4, 6, 5, 7]  # each head's rotary halves de-interleaved


def test_every_layer_linear_gets_the_blocks_of_its_own_weight(bf16_model: LoadedModel) -> None:
    layers = linears(bf16_model)
    assert len(layers) == 7 * bf16_model.model.config.num_hidden_layers
    assert all(int4_weight(module) is not None for module in layers)
    assert int4_weight(bf16_model.model.lm_head) is None  # Q8_0 in the GGUF: it stays bf16
    module = bf16_model.model.model.layers[3].self_attn.k_proj  # a row-permuted one
    x = torch.randn(3, module.in_features).to(torch.bfloat16)
    exact = x.float() @ module.weight.float().T
    got = int4_weight(module).mm(x).float()  # type: ignore[union-attr]
    # Only the scales' bf16 rounding (and the output's) separates the two: a wrong row order or nibble is off by O(1).
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_few_rows_take_int4_and_more_rows_bf16(bf16_model: LoadedModel) -> None:
    module = bf16_model.model.model.layers[0].mlp.down_proj
    int4, packed = int4_weight(module), packed_weight(module)
    assert int4 is not None and packed is not None
    with torch.inference_mode():
        for rows in (1, INT4_BELOW_ROWS - 1, INT4_BELOW_ROWS, 2 * INT4_BELOW_ROWS):
            x = torch.randn(1, rows, module.in_features).to(torch.bfloat16)
            expected = int4.mm(x) if rows < INT4_BELOW_ROWS else linear_pointwise(x, packed)
            assert torch.equal(module(x), expected), rows
            assert not torch.equal(int4.mm(x), linear_pointwise(x, packed))  # the two paths really differ


def test_a_changed_weight_drops_its_int4_copy(bf16_model: LoadedModel) -> None:
    model = copy.deepcopy(bf16_model.model)  # a deepcopy has plain weights, no copies: give it its own
    from inference.cpu_kernels import pack_linears
    from inference.gguf_int4 import attach_gguf_int4

    pack_linears(model)
    blocks = q4_1_blocks(model, embedded_gguf_path())
    assert attach_gguf_int4(model, blocks) == 7 * model.config.num_hidden_layers
    module = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        module.weight.mul_(2.0)
    x = torch.randn(1, module.in_features).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(module(x), torch.nn.functional.linear(x, module.weight))
    assert int4_weight(module) is None


def test_gguf_int4_off_serves_bf16_only(settings: Settings, bf16_model: LoadedModel) -> None:
    from inference.native_step import native_step

    plain = load_model(settings.model_copy(update={"gguf_int4": False}))
    assert not any(int4_weight(module) is not None for module in linears(plain))
    assert native_step(plain.model) is None and native_step(bf16_model.model) is None
    assert "int4" in bf16_model.info.quantization and "int4" not in plain.info.quantization
    assert plain.info.quantization.startswith("none")


async def test_a_lone_greedy_request_gives_the_same_text_on_both_engines(
    settings: Settings, bf16_model: LoadedModel
) -> None:
    """bf16, int4 for few rows, the lean decoder: one request at a time, the same tokens on both engines."""
    batched, sequential = engine_for(settings, bf16_model, "batched"), engine_for(settings, bf16_model, "sequential")
    assert isinstance(batched, BatchedEngine) and isinstance(sequential, SequentialEngine)
    assert batched.decoder is not None and batched.decoder.native is None
    for text in PROMPTS:
        request = GenerationRequest(messages=(Message("user", text),), max_new_tokens=48, temperature=0.0)
        alone = await sequential.generate(request)
        together = await batched.generate(request)
        assert together.text == alone.text and together.output_length == alone.output_length, text
    batched.close()
    sequential.close()
