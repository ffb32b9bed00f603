"""Decoding passes of the embedded model, up to MAX_ROWS rows, as one native call (inference/native/decode_step.c).

With the GGUF's 4-bit blocks a 1-row step of the 135M model reads ~60 MB, yet it took ~9 ms in torch: ~3 ms in the
int4 matmuls, 1.3 ms in the bf16 head, the rest in ~700 small tensor ops and Python calls (norms, rotary, cache
appends, attention, adds) that each cost microseconds of dispatch for a few hundred floats of work. llama.cpp does
the step in one C loop; so does this. One call runs the 30 layers and the head: the GGUF's own Q4_1 blocks (and the
tied head's Q8_0 ones) regrouped 8 output rows at a time at load, activations quantised per block of 32 to 8 bits
(llama.cpp's arithmetic for this file), norms, rotary embedding and attention in float32, each row's key and value
written into the caller's bf16 cache. Measured on the 2-core CPU: 3.4-4.1 ms a 1-row step against 9-13 ms for the
torch int4 path; faster at every row count up to 32 (9 vs 18-24 ms at 8 rows, 25-40 vs 27-43 at 16-32). See
docs/throughput.md.

The C file is compiled at load by the system C compiler (`cc -O3 -march=native -fopenmp`, ~1 s) into
MODEL_CACHE_DIR, keyed by its source, the compiler, the CPU's flags and torch's version. No compiler, no x86-64 with
AVX2, or a failed build: a warning, and torch's int4 path serves as before.

Both engines take it for every decoding pass of up to MAX_ROWS rows: the batched engine's lean decoder calls
`NativeStep.logits`, and the model's forward hands one-token steps to it (`install`: the sequential engine's
`generate`, the batched engine without FAST_DECODE), so a lone greedy request gives the same tokens on both.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "native" / "decode_step.c"
MAX_ROWS = 32  # decode_step.c's MAX_ROWS
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]


class _Model(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("inter", ctypes.c_int),
        ("threads", ctypes.c_int),
        ("rope_scaling", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("inv_freq", ctypes.c_void_p),
        ("embedding", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("final_eps", ctypes.c_float),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_void_p),
        ("eps2", ctypes.c_void_p),
        ("qkv", ctypes.c_void_p),
        ("o", ctypes.c_void_p),
        ("gate_up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("head", ctypes.c_void_p),
        ("vocab", ctypes.c_int),
    ]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_library(cache_dir: Path | None, extra_flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """decode_step.c compiled for this CPU (cached in `cache_dir`), or None with a warning when it cannot be.

    `extra_flags` go to the compiler after the others (tests build the AVX2-only variant with them)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    flags = _cpu_flags().split()
    if compiler is None or platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= set(flags):
        logger.warning("no C compiler, or not x86-64 with AVX2: the native decoding step is off, torch's int4 serves")
        return None
    try:
        sources = [path.read_text() for path in sorted(SOURCE.parent.iterdir()) if path.suffix in (".c", ".h")]
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        recipe = [*sources, version, " ".join([*_FLAGS, *extra_flags]), " ".join(flags), torch.__version__]
        key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
        directory = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"decode_step-{key}.so"
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run(
                    [compiler, *_FLAGS, *extra_flags, "-o", str(built), str(SOURCE), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if result.returncode != 0:
                    logger.warning(
                        "building the native decoding step failed; torch's int4 path serves:\n%s", result.stderr[-2000:]
                    )
                    return None
                os.replace(built, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("the native decoding step is off (%s); torch's int4 path serves", error)
        return None
    library.native_new.restype = ctypes.c_void_p
    library.native_new.argtypes = [ctypes.POINTER(_Model)]
    library.native_free.argtypes = [ctypes.c_void_p]
    library.native_step.restype = ctypes.c_int
    pointer = ctypes.c_void_p
    library.native_step.argtypes = [pointer, ctypes.c_int] + [pointer] * 5 + [ctypes.c_int64, pointer, pointer]
    return library


GROUP = 8  # output rows interleaved per group (decode_step.c)


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
    """Q4_1 blocks (rows, blocks * 20 bytes) regrouped for decode_step.c: per 8 rows and block, the 8 fp16 scales,
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
    """Q8_0 blocks (rows, blocks * 34 bytes) regrouped for decode_step.c's head: per 8 rows and block, the 8 fp16
    scales, then 8 chunks of 32 bytes where byte 4j+i of chunk k holds row j's code 4k+i plus 128 (unsigned)."""
    data, scales = _by_group(raw, 34)
    groups, _, blocks, _ = data.shape
    codes = (data[..., 2:] ^ 0x80).reshape(groups, GROUP, blocks, 8, 4)  # signed + 128 = flipped top bit
    chunks = codes.transpose(0, 2, 3, 1, 4).reshape(groups, blocks, 8 * 4 * GROUP)
    return np.ascontiguousarray(np.concatenate([scales, chunks], axis=-1)).reshape(-1)


def _pointers(arrays: Sequence[Any]) -> np.ndarray:
    return np.array([a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr() for a in arrays], dtype=np.uint64)


class NativeStep:
    """The native decoding step of one Llama model; `logits(tokens, positions, starts, cache)` per pass.

    `blocks` maps (layer, module name as in transformers, e.g. "self_attn.q_proj") to that linear's Q4_1 blocks,
    (rows, bytes) in transformers' row order (inference.gguf_int4.q4_1_blocks). The model's other weights (bf16
    embedding and norms) are read in place; the blocks are concatenated per fused matmul (~60 MB).
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
        keep: list[Any] = []  # everything the C side points into

        def hold(value: Any) -> Any:
            keep.append(value)
            return value

        def fused(layer: int, names: list[str]) -> np.ndarray:
            return hold(interleave(np.concatenate([blocks[(layer, name)] for name in names])))

        qkv, o, gate_up, down = [], [], [], []
        for index in range(self.layer_count):
            qkv.append(fused(index, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
            o.append(fused(index, ["self_attn.o_proj"]))
            gate_up.append(fused(index, ["mlp.gate_proj", "mlp.up_proj"]))
            down.append(fused(index, ["mlp.down_proj"]))
        layers = decoder.layers
        norm1 = [hold(layer.input_layernorm.weight.detach().contiguous()) for layer in layers]
        norm2 = [hold(layer.post_attention_layernorm.weight.detach().contiguous()) for layer in layers]
        rotary = decoder.rotary_emb
        embedding = hold(decoder.embed_tokens.weight.detach().contiguous())
        final_norm = hold(decoder.norm.weight.detach().contiguous())
        inv_freq = hold(rotary.inv_freq.detach().float().contiguous())
        arrays = [hold(_pointers(group)) for group in (norm1, norm2, qkv, o, gate_up, down)]
        eps1 = hold(np.array([layer.input_layernorm.variance_epsilon for layer in layers], dtype=np.float32))
        head_blocks = hold(interleave_q8_0(head)) if head is not None else None
        self.vocab = int(decoder.embed_tokens.weight.shape[0])
        if head is not None and head.shape[0] != self.vocab:
            head_blocks = None
        eps2 = hold(np.array([layer.post_attention_layernorm.variance_epsilon for layer in layers], dtype=np.float32))
        self._model = _Model(
            layers=self.layer_count,
            hidden=int(config.hidden_size),
            heads=int(config.num_attention_heads),
            kv_heads=int(config.num_key_value_heads),
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
        """(rows, vocab) logits of one new token per row (float32; bf16 from torch's head where the head is not
        native); appends each row's key and value to `cache`.

        `cache` is a transformers cache whose layers hold the rows' keys and values right-aligned, `starts[r]` the
        first column of row r that is not left padding. One call at a time (the scratch memory is shared).
        """
        from inference.kv_cache import reserve_columns

        rows = int(tokens.shape[0])
        if not 1 <= rows <= MAX_ROWS or len(starts) != rows or positions.shape != tokens.shape:
            raise ValueError(f"the native step takes 1 to {MAX_ROWS} rows, each with a position and a start")
        with self._lock:
            return self._logits(rows, tokens, positions, starts, cache, reserve_columns)

    def _logits(
        self, rows: int, tokens: torch.Tensor, positions: torch.Tensor, starts: Sequence[int], cache: Any, reserve: Any
    ) -> torch.Tensor:
        layers = cache.layers
        length, buffers = reserve(layers, rows, 1)
        if any(not 0 <= start <= length for start in starts):
            raise ValueError("a row starts past the end of the cache")
        tokens64 = tokens.to(torch.int64).contiguous()
        positions64 = positions.to(torch.int64).contiguous()
        keys = np.array([k.data_ptr() for k, _ in buffers], dtype=np.uint64)
        values = np.array([v.data_ptr() for _, v in buffers], dtype=np.uint64)
        capacity = np.array([k.shape[2] for k, _ in buffers], dtype=np.int64)
        starts64 = np.asarray(starts, dtype=np.int64)
        if self.native_head:
            out = torch.empty((rows, self.vocab), dtype=torch.float32)
        else:
            out = torch.empty((rows, self.hidden), dtype=torch.bfloat16)
        status = self.library.native_step(
            self._context,
            rows,
            tokens64.data_ptr(),
            positions64.data_ptr(),
            keys.ctypes.data,
            values.ctypes.data,
            capacity.ctypes.data,
            ctypes.c_int64(length),
            starts64.ctypes.data,
            out.data_ptr(),
        )
        if status != 0:
            raise ValueError("the native decoding step refused its arguments (a token outside the vocabulary?)")
        for layer, (key, value) in zip(layers, buffers, strict=True):
            layer.keys, layer.values = key[:, :, : length + 1], value[:, :, : length + 1]
        return out if self.native_head else self.head(out)


# model -> its NativeStep (kept outside the model: a deepcopy or `.to(...)` of the model gets none)
_steps: weakref.WeakKeyDictionary[Any, NativeStep] = weakref.WeakKeyDictionary()


def native_step(model: Any) -> NativeStep | None:
    """The model's native step (`install`), if it has one built from the weights the model still has."""
    step = _steps.get(model)
    if step is None:
        return None
    if not step.current():
        del _steps[model]
        logger.warning("the model's weights changed: the native decoding step is off for it")
        return None
    return step


def install(
    model: Any,
    blocks: dict[tuple[int, str], np.ndarray],
    head: np.ndarray | None,
    cache_dir: Path | None,
) -> NativeStep | None:
    """Build the native step for `model` and route its single-token forward passes through it (`model.generate`).

    None (the torch path serves) when the library cannot be built or a linear has no Q4_1 blocks.
    """
    config = model.config
    if len(blocks) != 7 * config.num_hidden_layers:
        return None
    library = build_library(cache_dir)
    if library is None:
        return None
    step = NativeStep(library, model, blocks, head)
    _steps[model] = step
    if not getattr(type(model), "_routes_to_native_step", False):
        model.__class__ = _routing_class(type(model))
    return step


@functools.cache
def _routing_class(base: type) -> type:
    """`base` (a transformers causal LM class) whose forward hands plain decoding steps to the model's native step.

    A class, not a wrapper on the instance: a deepcopy of the model shares the class but has no native step of its
    own (`native_step` is per model object), so its forward is transformers' again.
    """

    class RoutesToNativeStep(base):  # type: ignore[misc,valid-type]
        _routes_to_native_step = True

        @functools.wraps(base.forward)  # `generate` reads the signature to know which arguments the model takes
        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            logits = _decode_step(self, args, kwargs)
            if logits is None:
                return base.forward(self, *args, **kwargs)
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return CausalLMOutputWithPast(logits=logits[:, None, :], cache=kwargs["cache"])

    RoutesToNativeStep.__name__ = RoutesToNativeStep.__qualname__ = base.__name__
    return RoutesToNativeStep


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


def _decode_step(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Logits (rows, vocab) when this forward call is a plain decoding step the native step can take: one new token
    per row over a filled cache, rows left-padded at most (as `generate` and the batched engine call it)."""
    if args or torch.is_grad_enabled() or not set(kwargs) <= _PLAIN:
        return None
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("use_cache") is False:
        return None
    input_ids, cache = kwargs.get("input_ids"), kwargs.get("cache")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or not hasattr(cache, "layers"):
        return None
    rows = int(input_ids.shape[0])
    step = native_step(model) if rows <= MAX_ROWS else None
    if step is None:
        return None
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
    try:
        return step.logits(input_ids[:, 0], positions, starts, cache)
    except ValueError as error:  # a cache it cannot take (say, partly filled layers): transformers' code runs it
        logger.debug("decoding step left to transformers: %s", error)
        return None
