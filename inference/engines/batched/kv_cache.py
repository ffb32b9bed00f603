"""The batch's KV cache: the running rows' shared transformers `DynamicCache`, right-aligned, and its plumbing.

Every row's tokens end at the last column; shorter rows are left-padded, and the 2D attention mask marks the
padding. Each row gets its own `position_ids`, so padding never shifts positions. Joining pads the shorter side on
the left and concatenates on the batch axis; leaving selects rows and trims all-padding columns. Sliding window
layers (Gemma2) keep their last `window - 1` columns, which stay aligned on the right. Touched only by the batched
engine's decode thread (and by the lean decoder, `inference.cpu.lean_forward`, which writes into these caches).
"""

from __future__ import annotations

import functools
from typing import Any


class Batch:
    """The running rows and their shared, right-aligned KV cache. Touched only by the decode thread."""

    def __init__(self) -> None:
        self.slots: list[Any] = []  # inference.engines.batched.runner.Slot, one per row
        self.cache: Any = None  # transformers DynamicCache
        self.mask: Any = None  # (rows, columns) long: 1 = a real token, 0 = left padding
        self.positions: Any = None  # (rows,) long: the position id of each row's next input token
        self.next_tokens: Any = None  # (rows,) long: each row's next input token

    def __len__(self) -> int:
        return len(self.slots)

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])


@functools.cache
def _growable_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowableLayer(DynamicLayer):
        """A full-attention cache layer that appends into spare capacity.

        transformers' DynamicLayer concatenates the whole cache with each new token (O(length) copying per
        step, ~10 % of a decode step at 100 tokens on the 2-core CPU, more as outputs grow). This one keeps
        a buffer with room to spare and writes the new token in place; `keys`/`values` are views of it.
        When something else replaces `keys`/`values` (a row joins or leaves the batch), the next update
        adopts the new tensors into a fresh buffer.
        """

        def __init__(self) -> None:
            super().__init__()
            self._key_buffer: Any = None
            self._value_buffer: Any = None

        def reserve(self, rows: int, needed: int, like: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
            """The key and value buffers, owned and with room for `needed` columns (keys/values copied in)."""
            length = self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0
            buffer = self._key_buffer
            owned = (
                buffer is not None
                and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[0] == buffer.shape[0]
                and needed <= buffer.shape[-2]
            )
            if not owned:
                key_like, value_like = like if like is not None else (self.keys, self.values)
                capacity = needed + max(64, needed // 2)
                shape = (rows, key_like.shape[1], capacity, key_like.shape[-1])
                self._key_buffer = key_like.new_empty(shape)
                self._value_buffer = value_like.new_empty((*shape[:3], value_like.shape[-1]))
                if length:
                    self._key_buffer[:, :, :length] = self.keys
                    self._value_buffer[:, :, :length] = self.values
            return self._key_buffer, self._value_buffer

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.keys.shape[-2] if self.keys.numel() else 0
            needed = length + key_states.shape[-2]
            keys, values = self.reserve(key_states.shape[0], needed, (key_states, value_states))
            keys[:, :, length:needed] = key_states
            values[:, :, length:needed] = value_states
            self.keys = keys[:, :, :needed]
            self.values = values[:, :, :needed]
            return self.keys, self.values

    return GrowableLayer


def new_cache(config: Any) -> Any:
    """A DynamicCache for `config` whose full-attention layers grow in place (sliding-window ones are kept)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layer_class = _growable_layer_class()
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = layer_class()
    return cache


def reserve_columns(
    layers: list[Any], rows: int, extra: int, empty: tuple[Any, int, int] | None = None
) -> tuple[int, list[tuple[Any, Any]]]:
    """Room for `extra` more columns in every layer: (their common length, each layer's key and value buffers).

    The buffers are (rows, kv_heads, capacity, head_dim), their first `length` columns the layer's keys and values;
    a writer fills the next columns and then sets `keys`/`values` to the longer views. Plain full-attention layers
    (a cache `model.generate` made) become growable ones here. `empty` (dtype, kv_heads, head_dim): empty layers (a
    fresh cache) get buffers of that shape; without it an empty layer is refused.
    """
    import torch

    growable = _growable_layer_class()
    from transformers.cache_utils import DynamicLayer

    buffers = []
    length = -1
    for layer in layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = growable
            layer._key_buffer = layer._value_buffer = None
        if type(layer) is not growable:
            raise ValueError("the native step needs full-attention cache layers")
        if not layer.is_initialized or not layer.keys.numel():
            if empty is None:
                raise ValueError("the native step needs a filled full-attention cache")
            dtype, kv_heads, head_dim = empty
            like = torch.empty((rows, kv_heads, 0, head_dim), dtype=dtype)
            layer.lazy_initialization(like, like)
            columns = 0
            buffers_like: tuple[Any, Any] | None = (like, like)
        else:
            columns = int(layer.keys.shape[-2])
            buffers_like = None
            if int(layer.keys.shape[0]) != rows:
                raise ValueError("the cache's layers disagree on their rows")
        if length not in (-1, columns):
            raise ValueError("the cache's layers disagree on their length")
        length = columns
        buffers.append(layer.reserve(rows, length + extra, buffers_like))
    return length, buffers


def cache_layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _left_pad(tensor: Any, length: int, dim: int) -> Any:
    """`tensor` with zeros prepended along `dim` up to `length`."""
    import torch

    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _set_columns(cache: Any, columns: int) -> None:
    """Tell sliding-window layers how many columns the batch has (their mask offsets come from this)."""
    for layer in cache_layers(cache):
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = columns


def merge_batches(old: Batch, *news: Batch) -> None:
    """Append the rows of `news` to `old` (in place), right-aligning all caches on the column axis: one copy."""
    import torch

    parts = [batch for batch in (old, *news) if len(batch)]
    if not parts:
        return
    first = parts[0]
    if len(parts) > 1:
        columns = max(batch.columns for batch in parts)
        for layers in zip(*(cache_layers(batch.cache) for batch in parts), strict=True):
            if not all(getattr(layer, "is_initialized", True) and layer.keys is not None for layer in layers):
                continue
            if any(layer.keys.numel() == 0 for layer in layers):
                continue
            length = max(layer.keys.shape[-2] for layer in layers)
            layers[0].keys = torch.cat([_left_pad(layer.keys, length, -2) for layer in layers])
            layers[0].values = torch.cat([_left_pad(layer.values, length, -2) for layer in layers])
        _set_columns(first.cache, columns)
        first.mask = torch.cat([_left_pad(batch.mask, columns, 1) for batch in parts])
        first.positions = torch.cat([batch.positions for batch in parts])
        first.next_tokens = torch.cat([batch.next_tokens for batch in parts])
        first.slots = [slot for batch in parts for slot in batch.slots]
    old.slots, old.cache, old.mask = first.slots, first.cache, first.mask
    old.positions, old.next_tokens = first.positions, first.next_tokens


def keep_rows(batch: Batch, keep: list[int]) -> None:
    """Keep only rows `keep` (in place), then drop the columns that are padding in every remaining row."""
    import torch

    if not keep:
        batch.clear()
        return
    if len(keep) == len(batch):
        return
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    first_real = int(mask.any(0).int().argmax())  # leading columns that are padding everywhere
    columns = mask.shape[1] - first_real
    for layer in cache_layers(batch.cache):
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        layer_index = index.to(layer.keys.device)
        length = min(layer.keys.shape[-2], columns)
        layer.keys = layer.keys.index_select(0, layer_index)[:, :, -length:, :]
        layer.values = layer.values.index_select(0, layer_index)[:, :, -length:, :]
    _set_columns(batch.cache, columns)
    batch.mask = mask[:, first_real:]
    batch.positions = batch.positions.index_select(0, index)
    batch.next_tokens = batch.next_tokens.index_select(0, index)
    batch.slots = [batch.slots[i] for i in keep]


def truncate_cache(cache: Any, lengths: list[int]) -> None:
    """Put each layer back to `lengths` columns (undoes a failed pass's appends; the buffers are kept)."""
    for layer, length in zip(cache_layers(cache), lengths, strict=True):
        if layer.keys is not None and layer.keys.shape[-2] > length:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def snapshot_cache(cache: Any) -> list[tuple[Any, Any, int | None]]:
    """Each layer's keys, values (and sliding-window count) as they are now, for `restore_cache`.

    Exact for every layer kind: a growable layer writes past its current view and then takes a longer view, a
    sliding-window layer assigns new tensors, so the old references still hold the old contents.
    """
    return [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in cache_layers(cache)]


def restore_cache(cache: Any, snapshot: list[tuple[Any, Any, int | None]]) -> None:
    """Put every layer back to `snapshot` (undoes a failed pass, whatever it had written)."""
    for layer, (keys, values, count) in zip(cache_layers(cache), snapshot, strict=True):
        layer.keys, layer.values = keys, values
        if count is not None:
            layer.cumulative_length = count


def split_rows(batch: Batch, rows: list[int]) -> Batch:
    """A new batch of `batch`'s rows `rows` with a cache of their own (copies of those rows); `batch` is untouched."""
    import copy

    part = copy.copy(batch)
    part.cache = copy.copy(batch.cache)
    part.cache.layers = [copy.copy(layer) for layer in cache_layers(batch.cache)]
    if len(rows) == len(batch):  # keep_rows keeps every row as it is: copy them, or the two caches share buffers
        for layer in cache_layers(part.cache):
            if layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    keep_rows(part, rows)
    return part
