"""The embedded GGUF's own blocks, read and checked at load, for the native path (inference/cpu/native_forward.py).

The embedded model is published as a Q4_1 GGUF: every linear weight of its 30 layers is stored in blocks of 32
inputs, each a 4-bit code per weight with an fp16 scale `d` and minimum `m` (`w = d * q + m`). transformers
dequantises them when it loads the file; the native path multiplies by the blocks themselves, so a token reads
~66 MB of layer weights instead of ~212 MB in bf16.

Each tensor's blocks are checked against the weight transformers loaded (the dequantised blocks, rounded to the
model's dtype, must be that weight exactly), which also checks the name mapping and llama.cpp's row order for the
query and key projections. The token embedding and the tied output head are Q8_0 in this file (`q8_0_head`).

torch's own int4 kernel over the same blocks (`_weight_int4pack_mm_for_cpu`) served passes of few rows before the
native path; it is gone: it needs bf16 activations (AVX-512), and wherever it ran the native path is 2.5-3x faster
(docs/cpu-paths.md).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_BLOCK = 32
_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of 4-bit codes
# GGUF tensor name (in blk.N.) -> the Llama module under model.layers.N
_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: int  # ggml type id (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # innermost dimension first, as GGUF lists them
    data: np.ndarray  # the raw bytes, (rows, bytes per row), memory-mapped


def gguf_tensors(path: Path) -> list[GGUFTensor]:
    """The tensors of a GGUF file, without decoding its metadata.

    `gguf.GGUFReader` decodes every metadata field into numpy views, ~100k of them for this file's 49k-token
    vocabulary: 3-5 s here, longer than loading the model from the weight cache. This walks past the metadata and
    reads only the tensor index (GGUF v2/v3 layout, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(raw)
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, buffer, offset)
        offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal offset
        length = take("Q")
        offset += length
        return bytes(buffer[offset - length : offset]).decode("utf-8", errors="replace")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def skip_value(kind: int) -> Any:
        nonlocal offset
        if kind == 8:
            return string()
        if kind == 9:
            item, count = take("IQ")
            if item in scalar:
                offset += count * struct.calcsize(scalar[item])
            else:
                for _ in range(count):
                    skip_value(item)
            return None
        return take(scalar[kind])

    magic, version, tensor_count, field_count = take("4sIQQ")
    if magic != b"GGUF" or version < 2:
        raise ValueError(f"{path} is not a GGUF v2+ file")
    alignment = 32
    for _ in range(field_count):
        key = string()
        value = skip_value(take("I"))
        if key == "general.alignment":
            alignment = int(value)
    index = []
    for _ in range(tensor_count):
        name = string()
        dims = take("I")
        shape = tuple(int(take("Q")) for _ in range(dims))
        index.append((name, take("I"), shape, take("Q")))
    start = -(-offset // alignment) * alignment
    tensors = []
    for name, kind, shape, at in index:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        rows = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = shape[0] // block * block_bytes
        data = raw[start + at : start + at + rows * row_bytes].reshape(rows, row_bytes)
        tensors.append(GGUFTensor(name, kind, shape, data))
    return tensors


def q4_1_codes(raw: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, columns) uint8 0-15, d (rows, blocks) float32, m (rows, blocks) float32) of a Q4_1 tensor.

    A block's 16 code bytes hold weight j in the low nibble of byte j and weight j + 16 in its high nibble (ggml's
    `dequantize_row_q4_1`).
    """
    blocks = columns // _BLOCK
    data = np.ascontiguousarray(raw).reshape(raw.shape[0], blocks, _BLOCK_BYTES)
    d = data[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = data[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = data[:, :, 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # (rows, blocks, 32)
    return codes.reshape(raw.shape[0], columns), d, m


def llama_rows(rows: int, heads: int) -> np.ndarray:
    """The GGUF row of each of transformers' rows for a query or key projection.

    llama.cpp's converter interleaves each head's two rotary halves; transformers' loader undoes it
    (`LlamaTensorProcessor._reverse_permute_weights`). The same permutation, applied to row indices.
    """
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def matches(codes: np.ndarray, d: np.ndarray, m: np.ndarray, weight: torch.Tensor) -> bool:
    """True when the blocks, dequantised as transformers does (float32, then the weight's dtype), are `weight`."""
    rows, columns = codes.shape
    blocks = codes.reshape(rows, columns // _BLOCK, _BLOCK).astype(np.float32)
    values = blocks * d[..., None] + m[..., None]
    return torch.equal(torch.from_numpy(values.reshape(rows, columns)).to(weight.dtype), weight.detach())


def q4_1_blocks(model: Any, gguf: Path | list[GGUFTensor]) -> dict[tuple[int, str], np.ndarray]:
    """The Q4_1 blocks of each layer linear of a Llama `model` loaded from `gguf` (the file, or its `gguf_tensors`),
    checked against its weights.

    Keys are (layer, module name under the layer, e.g. "self_attn.q_proj"); values the raw blocks (rows, bytes) in
    transformers' row order. A tensor that is not Q4_1, or whose blocks are not the loaded weight, is left out with a
    warning (then the native path is off: it needs them all).
    """
    if getattr(model.config, "model_type", None) != "llama":
        return {}
    from gguf import GGMLQuantizationType

    config = model.config
    layers = model.model.layers
    found = {}
    for tensor in gguf if isinstance(gguf, list) else gguf_tensors(gguf):
        parts = tensor.name.split(".")  # blk.N.attn_q.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _MODULES or parts[3] != "weight":
            continue
        module = layers[int(parts[1])].get_submodule(_MODULES[parts[2]])
        if tensor.kind != GGMLQuantizationType.Q4_1:
            kind = GGMLQuantizationType(tensor.kind).name
            logger.warning("%s is %s, not Q4_1: the native path needs Q4_1 blocks", tensor.name, kind)
            continue
        raw = tensor.data
        if parts[2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if parts[2] == "attn_q" else config.num_key_value_heads
            raw = raw[llama_rows(raw.shape[0], heads)]
        codes, d, m = q4_1_codes(raw, int(tensor.shape[0]))  # GGUF lists dimensions innermost first
        if codes.shape != tuple(module.weight.shape) or not matches(codes, d, m, module.weight):
            logger.warning("%s is not the loaded weight of %s: the native path is off", tensor.name, parts[2])
            continue
        found[(int(parts[1]), _MODULES[parts[2]])] = raw
    return found


def q8_0_head(model: Any, gguf: Path | list[GGUFTensor]) -> np.ndarray | None:
    """The output head's Q8_0 blocks (vocab, bytes) when `gguf` (the file, or its `gguf_tensors`) has them and they
    are the loaded head's weight.

    This file has no output tensor: the head is tied to the token embedding, stored as Q8_0 (an fp16 scale and 32
    signed 8-bit codes per block, `w = d * q`).
    """
    from gguf import GGMLQuantizationType

    tensors = {tensor.name: tensor for tensor in (gguf if isinstance(gguf, list) else gguf_tensors(gguf))}
    tensor = tensors.get("output.weight", tensors.get("token_embd.weight"))
    weight = model.lm_head.weight
    if tensor is None or tensor.kind != GGMLQuantizationType.Q8_0 or tensor.data.shape[0] != weight.shape[0]:
        return None
    columns = int(tensor.shape[0])
    data = np.ascontiguousarray(tensor.data).reshape(tensor.data.shape[0], columns // _BLOCK, 34)
    d = data[:, :, 0:2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
    codes = data[:, :, 2:].view(np.int8).astype(np.float32)
    values = torch.from_numpy((codes * d).reshape(data.shape[0], columns)).to(weight.dtype)
    if not torch.equal(values, weight.detach()):
        logger.warning("%s is not the loaded output head: the native path runs torch's head", tensor.name)
        return None
    return tensor.data


def serve_gguf_blocks(model: Any, gguf: Path, cache_dir: Path | None, isa: str) -> Any:
    """Build the native path for `model` (loaded from `gguf`) from the file's own blocks: its NativeForward.

    NativeBuildError (inference/cpu/native_build.py) when it cannot be (a tensor that is not the loaded weight, no
    compiler).
    """
    from inference.cpu.native_build import NativeBuildError
    from inference.cpu.native_forward import attach

    tensors = gguf_tensors(gguf)  # the index, read once for both
    blocks = q4_1_blocks(model, tensors)
    if not blocks:
        raise NativeBuildError("the model's linear layers have no Q4_1 blocks")
    step = attach(model, blocks, q8_0_head(model, tensors), cache_dir, isa)
    logger.debug("native forward pass: %.0f MB of blocks", step.nbytes / 1e6)
    return step
