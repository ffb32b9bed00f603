"""Forward passes of the embedded model as one native call each (inference/cpu/native/forward.c): the `native` path.

One call runs the 30 layers and the head over every token of a pass, decoding rows and prompt chunks alike, as
llama.cpp does (why, measured: docs/cpu-paths.md#the-measurements-behind-the-code): the GGUF's own Q4_1 blocks (and
the tied head's Q8_0 ones) regrouped 8 output rows at a time at load, activations quantised per block of 32 to 8
bits (llama.cpp's arithmetic for this file), norms, rotary embedding and attention in float32, each token's key and
value written into the caller's cache (bf16 or float32, the model's dtype). No bf16 hardware is needed, so it serves
every x86-64 CPU with AVX2+FMA+F16C.

The C file is compiled at load by the system C compiler (inference/cpu/native_build.py). No compiler, not x86-64 with
AVX2, or a failed build: a warning, and the path in force falls back (inference/cpu/paths.py `fell_back`).

Both engines take it: the batched engine's lean loop runs every pass through `NativeForward.forward`, and the model's
forward hands plain decoding steps and single-row prefills to it (`attach`: the sequential engine's `generate`, the
batched engine with FAST_DECODE=false). Every token's arithmetic is the same whatever else its pass carries, so a
greedy request gives the same tokens on both engines, alone or in a batch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.cpu.native_build import NativeBuildError, _Model, build_library
from inference.cpu.passes import DecodeRows, PromptRow

logger = logging.getLogger(__name__)
GROUP = 8  # output rows interleaved per group (native/matmul.h)


def _by_group(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (rows, blocks * block_bytes) as (groups, 8, blocks, block_bytes), and each group's 8 fp16 scales per
    block side by side (groups, blocks, 16): the first two bytes of every block."""
    rows = raw.shape[0]
    if rows % GROUP:
        raise ValueError(f"{rows} rows are not a multiple of {GROUP}")
    blocks = raw.shape[1] // block_bytes
    data = np.ascontiguousarray(raw).reshape(rows // GROUP, GROUP, blocks, block_bytes)
    return data, data[..., 0:2].transpose(0, 2, 1, 3).reshape(rows // GROUP, blocks, 2 * GROUP)


def interleave(raw: np.ndarray) -> np.ndarray:
    """Q4_1 blocks (rows, blocks * 20 bytes) regrouped for forward.c: per 8 rows and block, the 8 fp16 scales,
    the 8 fp16 minimums, then 4 chunks of 32 bytes where byte 4j+i of chunk c holds row j's code 8c+i (low nibble)
    and 8c+4+i (high nibble). The same bytes (rows * blocks * 20), moved."""
    data, scales = _by_group(raw, 20)
    groups, _, blocks, _ = data.shape
    minimums = data[..., 2:4].transpose(0, 2, 1, 3).reshape(groups, blocks, 2 * GROUP)
    packed = data[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # (groups, 8, blocks, 32): code e of each block
    codes = codes.reshape(groups, GROUP, blocks, 4, 2, 4)  # e = 8c + 4h + i
    chunks = codes[..., 0, :] | (codes[..., 1, :] << 4)  # (groups, j, blocks, c, i)
    chunks = chunks.transpose(0, 2, 3, 1, 4).reshape(groups, blocks, 128)  # (groups, blocks, c, j, i)
    return np.ascontiguousarray(np.concatenate([scales, minimums, chunks], axis=-1)).reshape(-1)


def interleave_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (rows, blocks * 34 bytes) regrouped for forward.c's head: per 8 rows and block, the 8 fp16
    scales, then 8 chunks of 32 bytes where byte 4j+i of chunk k holds row j's code 4k+i plus 128 (unsigned)."""
    data, scales = _by_group(raw, 34)
    groups, _, blocks, _ = data.shape
    codes = (data[..., 2:] ^ 0x80).reshape(groups, GROUP, blocks, 8, 4)  # signed + 128 = flipped top bit
    chunks = codes.transpose(0, 2, 3, 1, 4).reshape(groups, blocks, 8 * 4 * GROUP)
    return np.ascontiguousarray(np.concatenate([scales, chunks], axis=-1)).reshape(-1)


def _pointers(arrays: Sequence[Any]) -> np.ndarray:
    return np.array([a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr() for a in arrays], dtype=np.uint64)


class NativeForward:
    """The native forward pass of one Llama model: `forward(decode, prompts)` per pass, `logits` for decoding rows.

    `blocks` maps (layer, module name as in transformers, e.g. "self_attn.q_proj") to that linear's Q4_1 blocks,
    (rows, bytes) in transformers' row order (inference.cpu.gguf_blocks.q4_1_blocks). The model's embedding is read in
    place (bf16 or float32); norms are copied as float32; the blocks are concatenated per fused matmul (~60 MB).
    """

    def __init__(
        self, library: ctypes.CDLL, model: Any, blocks: dict[tuple[int, str], np.ndarray], head: np.ndarray | None
    ) -> None:
        config = model.config
        decoder = model.model
        self.library = library
        self.head = model.lm_head
        self.layer_count = len(decoder.layers)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.kv_heads, self.head_dim = int(config.num_key_value_heads), head_dim
        keep: list[Any] = []  # everything the C side points into

        def hold(value: Any) -> Any:
            keep.append(value)
            return value

        def fused(layer: int, names: list[str]) -> np.ndarray:
            return hold(interleave(np.concatenate([blocks[(layer, name)] for name in names])))

        def as_f32(weight: torch.Tensor) -> torch.Tensor:
            return hold(weight.detach().float().contiguous())

        qkv, o, gate_up, down = [], [], [], []
        for index in range(self.layer_count):
            qkv.append(fused(index, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
            o.append(fused(index, ["self_attn.o_proj"]))
            gate_up.append(fused(index, ["mlp.gate_proj", "mlp.up_proj"]))
            down.append(fused(index, ["mlp.down_proj"]))
        layers = decoder.layers
        norm1 = [as_f32(layer.input_layernorm.weight) for layer in layers]
        norm2 = [as_f32(layer.post_attention_layernorm.weight) for layer in layers]
        rotary = decoder.rotary_emb
        embedding = hold(decoder.embed_tokens.weight.detach().contiguous())
        if embedding.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"the native path takes bf16 or float32 models, not {embedding.dtype}")
        self.dtype = embedding.dtype  # the caches' dtype too
        final_norm = as_f32(decoder.norm.weight)
        inv_freq = hold(rotary.inv_freq.detach().float().contiguous())
        arrays = [hold(_pointers(group)) for group in (norm1, norm2, qkv, o, gate_up, down)]
        eps1 = hold(np.array([layer.input_layernorm.variance_epsilon for layer in layers], dtype=np.float32))
        eps2 = hold(np.array([layer.post_attention_layernorm.variance_epsilon for layer in layers], dtype=np.float32))
        self.vocab = int(decoder.embed_tokens.weight.shape[0])
        head_blocks = hold(interleave_q8_0(head)) if head is not None and head.shape[0] == self.vocab else None
        self._model = _Model(
            layers=self.layer_count,
            hidden=int(config.hidden_size),
            heads=int(config.num_attention_heads),
            kv_heads=self.kv_heads,
            head_dim=head_dim,
            inter=int(config.intermediate_size),
            threads=torch.get_num_threads(),
            rope_scaling=float(rotary.attention_scaling),
            attn_scale=head_dim**-0.5,
            inv_freq=inv_freq.data_ptr(),
            embedding=embedding.data_ptr(),
            final_norm=final_norm.data_ptr(),
            final_eps=float(decoder.norm.variance_epsilon),
            norm1=arrays[0].ctypes.data,
            norm2=arrays[1].ctypes.data,
            eps1=eps1.ctypes.data,
            eps2=eps2.ctypes.data,
            qkv=arrays[2].ctypes.data,
            o=arrays[3].ctypes.data,
            gate_up=arrays[4].ctypes.data,
            down=arrays[5].ctypes.data,
            head=None if head_blocks is None else head_blocks.ctypes.data,
            vocab=self.vocab,
            embedding_f32=int(self.dtype == torch.float32),
            cache_f32=int(self.dtype == torch.float32),
        )
        self._keep = keep
        self._weights = [(w, w.data_ptr(), w._version) for w in self._sources(model)]
        self.hidden = int(config.hidden_size)
        self.native_head = head_blocks is not None
        self.nbytes = sum(a.nbytes for a in qkv + o + gate_up + down)
        self.nbytes += 0 if head_blocks is None else head_blocks.nbytes
        context = library.native_new(ctypes.byref(self._model))
        if not context:
            raise MemoryError("native_new failed")
        self._context = context
        self._free: Callable[[Any], None] = library.native_free
        self._lock = threading.Lock()

    @staticmethod
    def _sources(model: Any) -> list[torch.Tensor]:
        decoder = model.model
        weights = [decoder.embed_tokens.weight, decoder.norm.weight]
        for layer in decoder.layers:
            weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            weights += [p for p in layer.self_attn.parameters()] + [p for p in layer.mlp.parameters()]
        return weights

    def current(self) -> bool:
        """False once any weight it was built from changed or was replaced (then it must not be used)."""
        return all(w.data_ptr() == ptr and w._version == version for w, ptr, version in self._weights)

    def __del__(self) -> None:
        context, self._context = getattr(self, "_context", None), None
        if context:
            self._free(context)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, starts: Sequence[int], cache: Any) -> torch.Tensor:
        """(rows, vocab) float32 logits of one new token per row over a shared right-aligned `cache` (whose row r
        starts at column `starts[r]`, after its left padding); appends each row's key and value to it."""
        rows = int(tokens.shape[0])
        if rows < 1 or len(starts) != rows or positions.shape != tokens.shape:
            raise ValueError("the native forward takes 1 or more rows, each with a position and a start")
        mask = torch.ones((rows, 1), dtype=torch.long)  # only its row count is read (with `starts`)
        with self._lock:
            logits, _ = self._forward(DecodeRows(tokens, positions, mask, cache), [], list(starts))
        assert logits is not None
        return logits

    def forward(
        self, decode: DecodeRows | None, prompts: Sequence[PromptRow]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One pass, as inference.cpu.lean_forward.LeanForward.forward: the next-token logits (float32) of the decoding
        rows (rows, vocab) and of each prompt chunk's last token (prompts, vocab); every cache gets its new keys and
        values. Nothing is appended when the arguments are refused (ValueError)."""
        if decode is None and not prompts:
            raise ValueError("a pass needs decoding rows or prompts")
        starts = [] if decode is None else decode.mask.argmax(dim=1).tolist()  # each row's first real column
        with self._lock:
            return self._forward(decode, prompts, starts)

    def _forward(
        self, decode: DecodeRows | None, prompts: Sequence[PromptRow], starts: list[int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        from inference.engines.batched.kv_cache import reserve_columns

        layers, dtype = self.layer_count, self.dtype
        element = torch.finfo(dtype).bits // 8
        tokens: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        segment: list[np.ndarray] = []
        column: list[np.ndarray] = []
        start: list[np.ndarray] = []
        keys: list[np.ndarray] = []
        values: list[np.ndarray] = []
        capacity: list[np.ndarray] = []
        finish: list[tuple[list[Any], list[tuple[Any, Any]], int]] = []  # (cache layers, buffers, new length)
        segments = 0

        def add_segments(buffers: list[tuple[Any, Any]], rows: int) -> None:
            key_base = np.array([k.data_ptr() for k, _ in buffers], dtype=np.uint64)
            value_base = np.array([v.data_ptr() for _, v in buffers], dtype=np.uint64)
            row_bytes = np.array([k.stride(0) * element for k, _ in buffers], dtype=np.uint64)
            offsets = np.arange(rows, dtype=np.uint64)[:, None] * row_bytes[None, :]  # (rows, layers)
            keys.append((key_base[None, :] + offsets).reshape(-1))
            values.append((value_base[None, :] + offsets).reshape(-1))
            room = np.array([k.shape[2] for k, _ in buffers], dtype=np.int64)
            capacity.append(np.broadcast_to(room, (rows, layers)).reshape(-1))

        decoding = 0
        if decode is not None:
            decoding = int(decode.tokens.shape[0])
            cache_layers = list(decode.cache.layers)
            length, buffers = reserve_columns(cache_layers, decoding, 1)
            if any(not 0 <= first <= length for first in starts):
                raise ValueError("a row starts past the end of the cache")
            tokens.append(decode.tokens.to(torch.int64))
            positions.append(decode.positions.to(torch.int64))
            segment.append(np.arange(decoding, dtype=np.int32))
            column.append(np.full(decoding, length, dtype=np.int64))
            start.append(np.asarray(starts, dtype=np.int64))
            add_segments(buffers, decoding)
            finish.append((cache_layers, buffers, length + 1))
            segments = decoding
        outputs = list(range(decoding))
        count = decoding
        for prompt in prompts:
            first, end = prompt.span()
            cache_layers = list(prompt.cache.layers)
            length, buffers = reserve_columns(cache_layers, 1, end - first, (dtype, self.kv_heads, self.head_dim))
            if length != first:
                raise ValueError(f"the prompt's cache holds {length} tokens, not the chunk's start {first}")
            tokens.append(prompt.ids[first:end].to(torch.int64))
            positions.append(torch.arange(first, end, dtype=torch.int64))
            segment.append(np.full(end - first, segments, dtype=np.int32))
            column.append(np.arange(first, end, dtype=np.int64))
            start.append(np.zeros(end - first, dtype=np.int64))
            add_segments(buffers, 1)
            finish.append((cache_layers, buffers, end))
            segments += 1
            count += end - first
            outputs.append(count - 1)
        token_ids = torch.cat(tokens).contiguous()
        position_ids = torch.cat(positions).contiguous()
        arrays = [np.ascontiguousarray(np.concatenate(a)) for a in (segment, column, start, keys, values, capacity)]
        wanted = np.asarray(outputs, dtype=np.int32)
        width = self.vocab if self.native_head else self.hidden
        out = torch.empty((len(outputs), width), dtype=torch.float32)
        status = self.library.native_forward(
            self._context,
            count,
            token_ids.data_ptr(),
            position_ids.data_ptr(),
            *(a.ctypes.data for a in arrays[:3]),
            segments,
            *(a.ctypes.data for a in arrays[3:]),
            len(outputs),
            wanted.ctypes.data,
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError("the native forward pass refused its arguments (a token outside the vocabulary?)")
        for cache_layers, buffers, length in finish:
            for layer, (key, value) in zip(cache_layers, buffers, strict=True):
                layer.keys, layer.values = key[:, :, :length], value[:, :, :length]
        logits = out if self.native_head else self.head(out.to(self.head.weight.dtype)).float()
        return (logits[:decoding] if decoding else None), (logits[decoding:] if prompts else None)


# model -> its NativeForward (kept outside the model: a deepcopy or `.to(...)` of the model gets none)
_steps: weakref.WeakKeyDictionary[Any, NativeForward] = weakref.WeakKeyDictionary()


def native_forward_of(model: Any) -> NativeForward | None:
    """The model's native forward (`attach`), if it has one built from the weights the model still has."""
    step = _steps.get(model)
    if step is None:
        return None
    if not step.current():
        del _steps[model]
        logger.warning("the model's weights changed: the native forward pass is off for it")
        return None
    return step


def attach(
    model: Any,
    blocks: dict[tuple[int, str], np.ndarray],
    head: np.ndarray | None,
    cache_dir: Path | None,
    isa: str = "auto",
) -> NativeForward:
    """Build the native forward for `model` and route its plain decoding and prefill calls through it.

    NativeBuildError when the library cannot be built or a linear has no Q4_1 blocks (the path falls back).
    """
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 8:
        raise NativeBuildError(f"head_dim {head_dim} is not a multiple of 8 (forward.c's attention)")
    if len(blocks) != 7 * config.num_hidden_layers:
        raise NativeBuildError(f"{7 * config.num_hidden_layers - len(blocks)} linear layers have no Q4_1 blocks")
    step = NativeForward(build_library(cache_dir, isa), model, blocks, head)
    _steps[model] = step
    if not getattr(type(model), "_routes_to_native_step", False):
        model.__class__ = _routing_class(type(model))
    return step


@functools.cache
def _routing_class(base: type) -> type:
    """`base` (a transformers causal LM class) whose forward hands plain decoding steps and single-row prefills to
    the model's native forward. Named `Native<base>` so a reader of the model's type sees it.

    A class, not a wrapper on the instance: a deepcopy of the model shares the class but has no native forward of its
    own (`native_forward_of` is per model object), so its forward is transformers' again.
    """

    @functools.wraps(base.forward)  # `generate` reads the signature to know which arguments the model takes
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        logits = _native_call(self, args, kwargs)
        if logits is None:
            return base.forward(self, *args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=logits[:, None, :], cache=kwargs["cache"])

    name = f"Native{base.__name__}"
    return type(name, (base,), {"forward": forward, "_routes_to_native_step": True, "__qualname__": name})


_PLAIN = {
    "input_ids",
    "cache",
    "attention_mask",
    "position_ids",
    "cache_position",
    "use_cache",
    "logits_to_keep",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
}


def _native_call(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Logits (rows, vocab) when this forward call is one the native forward can take: one new token per row over a
    filled cache, rows left-padded at most (as `generate` and the batched engine call it), or one row's prompt (or
    its continuation) with only its last logits wanted. None: transformers' forward runs it."""
    if args or torch.is_grad_enabled() or not set(kwargs) <= _PLAIN:
        return None
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("use_cache") is False:
        return None
    input_ids, cache = kwargs.get("input_ids"), kwargs.get("cache")
    if input_ids is None or input_ids.dim() != 2 or not hasattr(cache, "layers"):
        return None
    step = native_forward_of(model)
    if step is None:
        return None
    try:
        if input_ids.shape[1] == 1 and cache.get_seq_length() > 0:
            return _decoding_step(step, input_ids, cache, kwargs)
        if input_ids.shape[0] == 1 and kwargs.get("logits_to_keep") == 1:
            return _prefill(step, input_ids, cache, kwargs)
    except ValueError as error:  # a cache it cannot take (say, partly filled layers): transformers' code runs it
        logger.debug("forward pass left to transformers: %s", error)
    return None


def _decoding_step(step: NativeForward, input_ids: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> Any:
    rows = int(input_ids.shape[0])
    length = cache.get_seq_length()
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is None:
        starts = [0] * rows
    else:
        if tuple(mask.shape) != (rows, length + 1):
            return None
        first = mask.argmax(dim=1)  # each row's first real column; after it, no padding (right-aligned rows)
        if not bool((mask.sum(1) == length + 1 - first).all()):
            return None
        starts = first.tolist()
    if positions is None:
        positions = torch.full((rows,), length) - torch.tensor(starts)
    elif tuple(positions.shape) == (rows, 1):
        positions = positions[:, 0]
    else:
        return None
    return step.logits(input_ids[:, 0], positions, starts, cache)


def _prefill(step: NativeForward, input_ids: torch.Tensor, cache: Any, kwargs: dict[str, Any]) -> Any:
    length, count = cache.get_seq_length(), int(input_ids.shape[1])
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and not bool(mask.all()):
        return None
    expected = torch.arange(length, length + count)
    if positions is not None and not torch.equal(positions.reshape(-1).cpu(), expected):
        return None
    ids = torch.cat([torch.zeros(length, dtype=torch.long), input_ids[0].cpu()])  # only [length:] is read
    _, logits = step.forward(None, [PromptRow(ids, cache, start=length)])
    return logits
