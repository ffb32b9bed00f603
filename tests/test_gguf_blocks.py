"""The embedded GGUF's own blocks (inference/cpu/gguf_blocks.py): the tensor index, the Q4_1 codes, each layer linear's
blocks checked against its loaded weight; and GGUF_INT4=false, where the lean torch path serves the dequantised
weights instead of the native path. The native path itself: tests/test_native_forward.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from inference import BatchedEngine, GenerationRequest, Message, SequentialEngine
from inference.cpu.gguf_blocks import gguf_tensors, llama_rows, q4_1_blocks, q4_1_codes, q8_0_head
from inference.model.loading import LoadedModel, embedded_gguf_path, load_model
from tests.helpers import engine_for
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write one sentence about the sea.",
    "Sebutkan tiga pulau besar di Indonesia beserta penjelasan singkat tentang masing-masing pulau.",
    "Tell me a story.",
]


@pytest.fixture(scope="module")
def plain_model(settings: Settings) -> LoadedModel:
    """The embedded model with GGUF_INT4=false: the dequantised weights only, the lean torch path."""
    return load_model(settings.model_copy(update={"gguf_int4": False}))


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


def test_every_layer_linear_gets_the_blocks_of_its_own_weight(embedded_model: LoadedModel) -> None:
    model = embedded_model.model
    blocks = q4_1_blocks(model, embedded_gguf_path())
    assert len(blocks) == 7 * model.config.num_hidden_layers
    assert q8_0_head(model, embedded_gguf_path()) is not None  # the tied head, Q8_0 in this file
    raw = blocks[(3, "self_attn.k_proj")]  # a row-permuted one
    codes, d, m = q4_1_codes(raw, model.config.hidden_size)
    weight = model.model.layers[3].self_attn.k_proj.weight
    dequantised = (codes.reshape(codes.shape[0], -1, 32) * d[..., None] + m[..., None]).reshape(codes.shape)
    assert torch.equal(torch.from_numpy(dequantised).to(weight.dtype), weight.detach())
    other = copy.deepcopy(model)  # the shared model's weights stay untouched (its native step checks them)
    layers = other.model.layers
    with torch.no_grad():  # blocks that are not the weight (another layer's) are left out, with a warning
        layers[3].self_attn.k_proj.weight.copy_(layers[4].self_attn.k_proj.weight)
    wrong = q4_1_blocks(other, embedded_gguf_path())
    assert (3, "self_attn.k_proj") not in wrong and len(wrong) == len(blocks) - 1


def test_gguf_int4_off_serves_the_lean_path(plain_model: LoadedModel) -> None:
    from inference.cpu.native_forward import native_forward_of

    assert native_forward_of(plain_model.model) is None
    assert plain_model.info.decode_path == "lean" and plain_model.info.quantization.startswith("none")
    assert plain_model.path is not None and "GGUF_INT4=false" in plain_model.path.reason


async def test_a_lone_greedy_request_gives_the_same_text_on_both_engines(
    settings: Settings, plain_model: LoadedModel
) -> None:
    """The lean path (prepacked linears, the lean decoder): one request at a time, the same tokens on both engines."""
    batched, sequential = engine_for(settings, plain_model, "batched"), engine_for(settings, plain_model, "sequential")
    assert isinstance(batched, BatchedEngine) and isinstance(sequential, SequentialEngine)
    assert type(batched.lean_pass).__name__ == "LeanForward"
    for text in PROMPTS:
        request = GenerationRequest(messages=(Message("user", text),), max_new_tokens=48, temperature=0.0)
        alone = await sequential.generate(request)
        together = await batched.generate(request)
        assert together.text == alone.text and together.output_length == alone.output_length, text
    batched.close()
    sequential.close()
