"""The KV of recent prompts, so a new prompt starts from the longest prefix it shares with one (PREFIX_CACHE_TOKENS).

Chat prompts share their start: the template and system message (24 of the 37-67 tokens of the benchmark's chat
prompts with the embedded model), and a conversation's next turn shares the whole earlier prompt. On the native path
a token's key and value are the same bits whatever pass computed them (inference/cpu/native/forward.c), so starting from
another prompt's cached prefix gives exactly the cache a full prefill would: replies do not change, only the time to
the first token (docs/cpu-paths.md). Other paths round differently by pass shape, so they do not use it.

Touched only by the batched engine's decode thread. Entries are evicted least recently used first, once their tokens
add up to more than the budget.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

MIN_SHARED_TOKENS = 8  # a shorter common prefix is not worth the copy


class PrefixCache:
    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = budget_tokens
        self._entries: collections.OrderedDict[int, tuple[np.ndarray, list[tuple[Any, Any]]]] = (
            collections.OrderedDict()
        )
        self._tokens = 0
        self._next = 0
        self.hit_tokens = 0  # prompt tokens taken from the cache instead of computed (for tests and metrics)

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, ids: list[int], cache: Any) -> None:
        """Keep a copy of `cache`'s keys and values: the prompt `ids`, fully prefilled (one row, len(ids) columns)."""
        if not 0 < len(ids) <= self.budget_tokens:
            return
        count = len(ids)
        layers = [(layer.keys[:, :, :count].clone(), layer.values[:, :, :count].clone()) for layer in cache.layers]
        self._entries[self._next] = (np.asarray(ids, dtype=np.int64), layers)
        self._next += 1
        self._tokens += len(ids)
        while self._tokens > self.budget_tokens:
            _, (old, _) = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def take(self, ids: list[int], cache: Any) -> int:
        """Fill the empty `cache` with the longest cached prefix of `ids` (never all of it: the last token is left to
        compute, for its logits); returns its length, 0 when nothing worth it is shared."""
        if not self._entries or len(ids) <= MIN_SHARED_TOKENS:
            return 0
        wanted = np.asarray(ids, dtype=np.int64)
        best, best_key = 0, None
        for key, (stored, _) in self._entries.items():
            length = min(len(stored), len(wanted) - 1)
            differ = np.flatnonzero(stored[:length] != wanted[:length])
            shared = int(differ[0]) if differ.size else length
            if shared > best:
                best, best_key = shared, key
        if best < MIN_SHARED_TOKENS or best_key is None:
            return 0
        self._entries.move_to_end(best_key)
        _, layers = self._entries[best_key]
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys[:, :, :best], values[:, :, :best]  # views: the next write copies them
        self.hit_tokens += best
        return best
