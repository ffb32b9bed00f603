"""Memory admission (MEMORY_CHECK): a request is admitted only when its KV cache and its prefill fit the memory that was
left once the model was ready, so a long prompt is refused or kept waiting instead of the kernel's OOM killer ending
the process and every other user's stream with it (issue 28: a 4,096-token prompt did that to the 9B shape in 8-bit).

The budget is a ledger, not a reading of free memory at each request: what was left at ready (RAM capped by a cgroup
limit, v1 or v2, and by RLIMIT_AS; free VRAM on CUDA: `inference.model.memory.available_bytes`) less a reserve, against
the bounds of the admitted requests. A request's bound is its prompt plus its `max_new_tokens`; its cost:
- the KV cache of that many tokens (every layer's keys and values in the cache dtype; sliding-window layers hold at
  most their window), times 1.5: a growing cache layer keeps half its length spare (`batched.kv_cache`);
- in the batched engine the running rows share one right-aligned cache, so a batch costs rows x its longest row;
- plus its prefill's peak, once: eager attention's scores for a chunk of the prompt against the whole prompt (in
  float32, a few live copies; eager attention only, as Gemma2's: sdpa and the native path work in blocks), the
  chunk's MLP activations, one dequantised linear and what the heap keeps of the pass's smaller blocks.
The estimate errs high; the measurements behind it are in docs/operations.md#memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from inference.model.memory import RESERVE_BYTES, RESERVE_FRACTION, gb
from inference.types import InvalidRequest

GROWTH = 1.5  # a growable cache layer's spare room (kv_cache.GrowableLayer.reserve: needed + needed // 2)
SCORE_COPIES = 4  # eager attention's live copies of the scores: the product, the soft-cap, the mask added, softmax
FLOAT32 = 4


class ExceedsMemory(InvalidRequest):
    """The request can never fit the memory this server has for requests (400: a shorter prompt or fewer tokens)."""


@dataclass(frozen=True)
class ModelShape:
    """What a request's memory depends on, from the model's config."""

    layers: int
    kv_row_bytes: int  # one token's keys and values in one layer, in the cache dtype
    windows: tuple[int | None, ...]  # each layer's sliding window, None for full attention
    heads: int
    hidden: int
    intermediate: int
    vocab: int
    eager: bool  # eager attention materialises the scores; sdpa/flash kernels (and the native path) work in blocks

    @classmethod
    def of(cls, config: Any, cache_dtype_bytes: int) -> ModelShape:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layers = int(config.num_hidden_layers)
        types = getattr(config, "layer_types", None) or ["full_attention"] * layers
        window = getattr(config, "sliding_window", None)
        windows = tuple(int(window) if kind == "sliding_attention" and window else None for kind in types)
        return cls(
            layers=layers,
            kv_row_bytes=2 * kv_heads * head_dim * cache_dtype_bytes,
            windows=windows,
            heads=heads,
            hidden=int(config.hidden_size),
            intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
            vocab=int(config.vocab_size),
            eager=getattr(config, "_attn_implementation", None) in (None, "eager"),
        )

    def kv_bytes(self, tokens: int) -> int:
        """One row's KV cache at `tokens` tokens, its spare room included."""
        columns = sum(tokens if window is None else min(tokens, window) for window in self.windows)
        return int(GROWTH * columns * self.kv_row_bytes)

    def prefill_bytes(self, chunk: int, columns: int) -> int:
        """The peak of one prefill forward: `chunk` query tokens against `columns` keys (rows x prompt, all rows)."""
        scores = SCORE_COPIES * self.heads * chunk * columns * FLOAT32 if self.eager else 0
        masks = 2 * chunk * columns * FLOAT32  # a full and a sliding causal mask
        activations = chunk * (3 * self.intermediate + 8 * self.hidden) * FLOAT32
        dequantised = self.hidden * max(self.intermediate, self.hidden) * FLOAT32  # bitsandbytes' per-call weight
        # Blocks under glibc's mmap threshold that the heap keeps while the pass runs (the KV cache allocated between
        # them pins the holes): about two float32 hidden states per layer, fitted to the 9B shape in 8-bit.
        retained = 2 * self.layers * chunk * self.hidden * FLOAT32
        return scores + masks + activations + dequantised + retained + 16 * self.vocab * FLOAT32


class MemoryBudget:
    """The memory requests may take, and whether a set of them fits. `capacity` only ever grows (`check`), one
    assignment at a time: safe to read from any thread."""

    def __init__(
        self,
        shape: ModelShape,
        capacity: int,
        where: str,
        prefill_chunk: int,
        group_tokens: int,
        measure: Callable[[], tuple[int, str]] | None = None,
    ) -> None:
        self.shape = shape
        self.capacity = capacity  # bytes the requests may take together
        self.where = where  # what the capacity was taken from, for the 400's message
        self.prefill_chunk = prefill_chunk  # query tokens per prefill forward (0: the whole prompt)
        self.group_tokens = group_tokens  # the most padded prompt tokens prefilled together
        self._measure = measure  # (free bytes, where) now: `inference.model.memory.available_bytes`

    @classmethod
    def at_ready(
        cls,
        config: Any,
        cache_dtype_bytes: int,
        measure: Callable[[], tuple[int, str]],
        prefill_chunk: int,
        group_tokens: int,
    ) -> MemoryBudget:
        """The budget from what `measure` says is free now that the model is loaded, less the runtime reserve."""
        capacity, where = capacity_of(measure())
        return cls(ModelShape.of(config, cache_dtype_bytes), capacity, where, prefill_chunk, group_tokens, measure)

    def prefill_peak(self, prompts: Iterable[int]) -> int:
        """The prefill peak of the prompts (lengths) still to prefill: the longest alone, or a padded group of them."""
        lengths = list(prompts)
        if not lengths:
            return 0
        longest = max(lengths)
        columns = longest if len(lengths) == 1 else max(longest, min(self.group_tokens, len(lengths) * longest))
        chunk = min(self.prefill_chunk or longest, longest)
        return self.shape.prefill_bytes(chunk, columns)

    def cost(self, bounds: list[int], prompts: Iterable[int] = ()) -> int:
        """Bytes of a batch of rows with these token bounds (padded to its longest), plus the prefill of `prompts`."""
        if not bounds:
            return self.prefill_peak(prompts)
        return len(bounds) * self.shape.kv_bytes(max(bounds)) + self.prefill_peak(prompts)

    def fits(self, bounds: list[int], prompts: Iterable[int] = ()) -> bool:
        return self.cost(bounds, prompts) <= self.capacity

    def check(self, prompt_tokens: int, max_new_tokens: int, idle: bool = False) -> None:
        """ExceedsMemory (400) for a request that could not fit even alone.

        Before refusing, an `idle` engine (nothing of its own in memory) measures again: memory another process held
        when the model became ready (a test run, a second model loading) may have been given back since."""
        need = self.cost([prompt_tokens + max_new_tokens], [prompt_tokens])
        if need > self.capacity and idle and self._measure is not None:
            capacity, where = capacity_of(self._measure())
            if capacity > self.capacity:
                self.capacity, self.where = capacity, where
        if need > self.capacity:
            raise ExceedsMemory(
                f"this request needs about {gb(need)} of memory (a {prompt_tokens}-token prompt and max_new_tokens "
                f"{max_new_tokens}: its KV cache and prefill), more than the {gb(self.capacity)} this server has for "
                f"requests ({self.where} once the model was loaded, less a reserve); send a shorter prompt or ask for "
                "fewer tokens"
            )


def capacity_of(available: tuple[int, str]) -> tuple[int, str]:
    """What requests may take of `available` (bytes, where): all of it less the runtime reserve (1 GB + 5 %)."""
    free, where = available
    return max(0, free - RESERVE_BYTES - int(RESERVE_FRACTION * free)), where
