"""Continuous batching: one decode loop in one thread serves every running request in shared forward passes.

How it works
- `submit` validates, then admits the request into a bounded waiting queue (`MAX_QUEUE`); a full queue
  is `EngineBusy` before any response byte, and a request that waits longer than `QUEUE_TIMEOUT` ends
  with `EngineBusy` too.
- The decode thread owns the model. Each iteration it first admits waiting requests into free slots
  (at most `MAX_BATCH` running): their prompts are prefilled together (left-padded) into a fresh KV
  cache, their first token is sampled straight from the prefill logits, and they are merged into the
  running batch. Then it runs ONE decode step for every running row (one token each). Rows that end
  (terminator, `max_new_tokens`, cancelled) leave the batch right after the step.
- With the lean decoder (FAST_DECODE, bf16 Llama on CPU: the embedded model) an iteration is ONE pass:
  the running rows' decode step and the newcomers' prompts (unpadded, at most `PASS_PROMPT_TOKENS` in all)
  share the matmuls; a newcomer joins the batch after the pass that completes its prompt. A longer prompt is
  prefilled in chunks over several passes while the running rows keep decoding (chunked prefill). A failing
  pass is rolled back and its parts rerun alone, so the failure stays with the request that causes it.
- The batch shares one transformers `DynamicCache`, right-aligned: every row's tokens end at the last
  column, shorter rows are left-padded, and the 2D attention mask marks the padding. Each row gets
  its own `position_ids`, so padding never shifts positions. Joining pads the shorter side on the
  left and concatenates on the batch axis; leaving selects rows and trims all-padding columns. Sliding
  window layers (Gemma2) keep their last `window - 1` columns, which stay aligned on the right.
- Sampling happens per row on the float32 logits, in the order transformers' `generate` uses:
  repetition penalty, temperature, top-k, top-p. Greedy rows take the argmax. Each request has its
  own `torch.Generator`, so a seeded request samples the same tokens whatever else is in the batch.
  A step needs a single device-to-host copy (the chosen token ids).
- Token ids go to each request's asyncio queue; the consumer side detokenizes them with the same
  `TextStreamer` logic as the sequential engine and applies stop sequences, so greedy texts match.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from inference.engine import GREEDY_BELOW_TEMPERATURE, LocalEngine
from inference.loading import LoadedModel, load_model
from inference.settings import EngineSettings
from inference.text import StopMatcher
from inference.types import (
    EngineBusy,
    EngineNotReady,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    StreamEvent,
    TextDelta,
)

logger = logging.getLogger(__name__)

# Prefill batching (see plan_prefill_groups): a forward pass's fixed cost in prompt-token equivalents, measured
# on the 2-core CPU with the embedded model (~55 ms per pass, ~0.5 ms per prompt token), and a guess for GPUs,
# where a pass's fixed cost dwarfs the per-token one. The budget caps the padded tokens of one prefill pass.
# MAX_BATCH=auto. On the 2-core CPU 16 rows gave ~1.5-1.7x the tok/s of 8 at 16 streams (README, Throughput);
# on a GPU each row's KV cache takes GPU memory (~0.34 MB per token for Gemma2-9B), so stay at 8 there.
AUTO_MAX_BATCH_CPU = 16
AUTO_MAX_BATCH_ACCELERATOR = 8
PREFILL_OVERHEAD_TOKENS_CPU = 100
PREFILL_OVERHEAD_TOKENS_ACCELERATOR = 1000
PREFILL_TOKEN_BUDGET = 8192
# Lean passes (inference/fast_decode.py) carry the running rows and prompt chunks together. This caps the prompt
# tokens of one pass (~0.4 ms each on the 2-core CPU): a long prompt is prefilled over several passes, so the running
# streams get a token at least every ~0.45 s meanwhile instead of stalling for the whole prompt (chunked prefill),
# while a burst of ordinary prompts (8 chat prompts of 40-200 tokens) still joins in one pass. 512 split such bursts
# in two (TTFT p95 at 8 clients 1.75-1.85x the single-client one vs 1.52-1.70x with one pass).
PASS_PROMPT_TOKENS = 1024


@dataclass(frozen=True)
class _Done:
    """The decode thread's last word on a row: why it ended."""

    finish_reason: str  # "stop" (terminator) or "length"


@dataclass(eq=False)
class _Slot:
    """One request inside the engine: what the decode thread needs, and where its tokens go."""

    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    submitted_at: float
    cancelled: bool = False
    generated: int = 0  # tokens sampled so far, the terminator excluded
    admitted_at: float | None = None
    generator: Any = None  # torch.Generator, made on the logits' device at the first sample
    history: list[int] = field(default_factory=list)  # prompt + output ids, kept for repetition_penalty only
    prompt: Any = None  # inference.fast_decode.PromptRow while the lean decoder prefills it, chunk by chunk
    prefilled: int = 0  # prompt tokens in `prompt.cache` so far

    @property
    def greedy(self) -> bool:
        # Tiny temperatures divide logits into inf/NaN: treat them as greedy, as the sequential engine does.
        return self.request.temperature < GREEDY_BELOW_TEMPERATURE


@functools.cache
def _collector_class() -> type:
    from transformers import TextStreamer

    class TextCollector(TextStreamer):
        """transformers' TextStreamer chunking (the sequential engine's), collecting pieces instead of printing."""

        def __init__(self, tokenizer: Any) -> None:
            super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
            self.pieces: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.pieces.append(text)

        def feed(self, token_id: int) -> list[str]:
            import torch

            self.put(torch.tensor([token_id]))
            return self.take()

        def finish(self) -> list[str]:
            self.end()
            return self.take()

        def take(self) -> list[str]:
            out, self.pieces = self.pieces, []
            return out

    return TextCollector


class _Batch:
    """The running rows and their shared, right-aligned KV cache. Touched only by the decode thread."""

    def __init__(self) -> None:
        self.slots: list[_Slot] = []
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

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = self.keys.shape[-2] if self.keys.numel() else 0
            needed = length + key_states.shape[-2]
            buffer = self._key_buffer
            owned = (
                buffer is not None
                and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[0] == buffer.shape[0]
                and needed <= buffer.shape[-2]
            )
            if not owned:
                capacity = needed + max(64, needed // 2)
                shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
                self._key_buffer = key_states.new_empty(shape)
                self._value_buffer = value_states.new_empty((*shape[:3], value_states.shape[-1]))
                if length:
                    self._key_buffer[:, :, :length] = self.keys
                    self._value_buffer[:, :, :length] = self.values
            self._key_buffer[:, :, length:needed] = key_states
            self._value_buffer[:, :, length:needed] = value_states
            self.keys = self._key_buffer[:, :, :needed]
            self.values = self._value_buffer[:, :, :needed]
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


def _cache_layers(cache: Any) -> list[Any]:
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
    for layer in _cache_layers(cache):
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = columns


def merge_batches(old: _Batch, *news: _Batch) -> None:
    """Append the rows of `news` to `old` (in place), right-aligning all caches on the column axis: one copy."""
    import torch

    parts = [batch for batch in (old, *news) if len(batch)]
    if not parts:
        return
    first = parts[0]
    if len(parts) > 1:
        columns = max(batch.columns for batch in parts)
        for layers in zip(*(_cache_layers(batch.cache) for batch in parts), strict=True):
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


def keep_rows(batch: _Batch, keep: list[int]) -> None:
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
    for layer in _cache_layers(batch.cache):
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


class BatchedEngine(LocalEngine):
    """Continuous (iteration-level) batching over the model, in one decode thread."""

    name = "batched"

    def __init__(self, settings: EngineSettings, loader: Callable[[EngineSettings], LoadedModel] = load_model) -> None:
        super().__init__(settings, loader)
        self.max_batch = 8 if settings.max_batch == "auto" else settings.max_batch  # "auto" is settled at load
        self.max_queue = settings.max_queue
        self.queue_timeout_s = settings.queue_timeout
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Slot] = collections.deque()
        self._active = 0  # admitted and not yet finished (being prefilled or in the batch)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._device: Any = None
        self._batch = _Batch()
        self._terminator_set: frozenset[int] = frozenset()
        self._decoder: Any = None  # inference.fast_decode.LlamaDecoder where it applies, else transformers' forward
        self._prefilling: list[_Slot] = []  # admitted, prompt not yet fully prefilled (lean decoder only)
        self.pass_prompt_tokens = PASS_PROMPT_TOKENS
        self._mean_duration_s = 10.0  # running estimate of one request's time in the batch, for Retry-After
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_rows_seen = 0  # the largest batch a step has run (for tests and metrics)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def on_loaded(self) -> None:
        self._device = self.model.get_input_embeddings().weight.device
        if self.settings.max_batch == "auto":
            self.max_batch = AUTO_MAX_BATCH_CPU if self._device.type == "cpu" else AUTO_MAX_BATCH_ACCELERATOR
        self._terminator_set = frozenset(self.terminators)
        self._decoder = None
        if self.settings.fast_decode and self._device.type == "cpu":
            from inference.fast_decode import LlamaDecoder

            if LlamaDecoder.supports(self.model):
                self._decoder = LlamaDecoder(self.model)
        logger.debug("decoding steps run on %s", "the lean Llama decoder" if self._decoder else "transformers' forward")

    def run_on_model_thread(self, work: Callable[[], None]) -> None:
        """The decode thread runs `work` (the load) first, then its loop; wait for `work` here."""
        if self._thread is not None:
            raise RuntimeError("the batched engine's decode thread is already running")
        loaded: concurrent.futures.Future[None] = concurrent.futures.Future()

        def main() -> None:
            try:
                work()
            except BaseException as error:
                loaded.set_exception(error)
                return
            loaded.set_result(None)
            self._run()

        self._thread = threading.Thread(target=main, name="batched-decode", daemon=True)
        self._thread.start()
        loaded.result()

    def close(self) -> None:
        super().close()
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for slot in waiting:
            self._post(slot, EngineNotReady("the service is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)  # the current step finishes, then the running rows are failed

    # ---- the event-loop side ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests admitted but still waiting for a slot in the batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._active

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        prompt_ids = self.prepare(request)
        loop = asyncio.get_running_loop()
        slot = _Slot(
            request=request,
            prompt_ids=prompt_ids,
            loop=loop,
            queue=asyncio.Queue(),
            submitted_at=time.perf_counter(),
        )
        if request.repetition_penalty not in (None, 1.0):
            slot.history = list(prompt_ids)
        with self._cond:
            if self._stopping:
                raise EngineNotReady("the service is shutting down")
            if self._active + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineBusy(
                    f"the server is busy ({self._active} generating, {len(self._waiting)} waiting); retry shortly",
                    retry_after_s=self._retry_after_s(),
                )
            self._waiting.append(slot)
            self._cond.notify()
        stream = self._stream(slot)
        weakref.finalize(stream, self._cancel, slot)  # a stream dropped before it is iterated frees its slot
        return stream

    def _retry_after_s(self) -> int:
        rounds = (len(self._waiting) + 1) / max(1, self.max_batch)
        return max(1, min(60, math.ceil(self._mean_duration_s * rounds)))

    def _cancel(self, slot: _Slot) -> None:
        slot.cancelled = True
        with self._cond, contextlib.suppress(ValueError):  # not waiting any more
            self._waiting.remove(slot)

    async def _stream(self, slot: _Slot) -> AsyncIterator[StreamEvent]:
        request = slot.request
        collector = _collector_class()(self.tokenizer)
        matcher = StopMatcher(request.stop)
        parts: list[str] = []
        consumed = 0
        first_token_at: float | None = None
        finish = "stop"
        try:
            while True:
                event = await slot.queue.get()
                if isinstance(event, int):
                    consumed += 1
                    pieces = collector.feed(event)
                elif isinstance(event, _Done):
                    finish = event.finish_reason
                    pieces = collector.finish()
                else:
                    raise event
                for piece in pieces:
                    text = matcher.feed(piece)
                    if text:
                        first_token_at = first_token_at or time.perf_counter()
                        parts.append(text)
                        yield TextDelta(text)
                    if matcher.stopped:
                        break
                if matcher.stopped:
                    finish = "stop"
                    self._cancel(slot)
                    break
                if isinstance(event, _Done):
                    break
            tail = matcher.flush()
            if tail:
                first_token_at = first_token_at or time.perf_counter()
                parts.append(tail)
                yield TextDelta(tail)
        finally:
            self._cancel(slot)  # a consumer that leaves early frees its row at the next step
        result = GenerationResult(
            text="".join(parts),
            input_length=len(slot.prompt_ids),
            output_length=consumed,
            finish_reason="stop" if finish == "stop" else "length",
            time_to_first_token_s=None if first_token_at is None else first_token_at - slot.submitted_at,
            duration_s=time.perf_counter() - slot.submitted_at,
        )
        self.report_result(request, result)
        yield result

    # ---- thread -> event loop --------------------------------------------------------------------------

    def _post(self, slot: _Slot, event: Any) -> None:
        self._post_many([(slot, event)])

    def _post_many(self, items: Iterable[tuple[_Slot, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Slot, Any]]] = {}
        for slot, event in items:
            by_loop.setdefault(slot.loop, []).append((slot, event))
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                for slot, _event in events:
                    slot.cancelled = True

    # ---- the decode thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while True:
                    newcomers = self._take_newcomers()
                    if newcomers is None:
                        break
                    if self._decoder is not None:
                        self._prefilling += newcomers
                        self._pass(self._plan_prompt_chunks())
                        continue
                    if newcomers:
                        self._admit(newcomers)
                    if len(self._batch):
                        self._step()
        except BaseException:  # never expected; keep the service honest about it
            logger.exception("the batched decode loop died")
            self.state, self.state_reason = "failed", "the decode loop stopped unexpectedly"
            raise
        finally:
            self._fail_all(EngineNotReady("the service is shutting down"))

    def _take_newcomers(self) -> list[_Slot] | None:
        """Waiting requests for the free rows (blocks while there is nothing to do); None to stop."""
        expired: list[_Slot] = []
        with self._cond:
            while not self._stopping and not self._waiting and not len(self._batch) and not self._prefilling:
                self._cond.wait()
            if self._stopping:
                return None
            now = time.perf_counter()
            while self._waiting and (
                self._waiting[0].cancelled or now - self._waiting[0].submitted_at > self.queue_timeout_s
            ):
                slot = self._waiting.popleft()
                if not slot.cancelled:
                    expired.append(slot)
            newcomers: list[_Slot] = []
            while self._waiting and self._active < self.max_batch:
                slot = self._waiting.popleft()
                if slot.cancelled:
                    continue
                slot.admitted_at = now
                newcomers.append(slot)
                self._active += 1
        for slot in expired:
            self._post(
                slot,
                EngineBusy(
                    f"the request waited {self.queue_timeout_s:g} s for a free slot (QUEUE_TIMEOUT); retry shortly",
                    retry_after_s=self._retry_after_s(),
                ),
            )
        return newcomers

    def _release(self, slots: list[_Slot]) -> None:
        if not slots:
            return
        now = time.perf_counter()
        with self._cond:
            self._active = max(0, self._active - len(slots))
        for slot in slots:
            if slot.admitted_at is not None and not slot.cancelled:
                self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * (now - slot.admitted_at)

    def _fail_all(self, error: InferenceError) -> None:
        slots = list(self._batch.slots) + self._prefilling
        self._batch.clear()
        self._prefilling = []
        with self._cond:
            slots += list(self._waiting)
            self._waiting.clear()
            self._active = 0
        self._post_many((slot, error) for slot in slots)

    def _admit(self, slots: list[_Slot]) -> None:
        """Prefill the newcomers in length-sorted groups (shortest first), each merged as soon as it is done."""
        overhead = PREFILL_OVERHEAD_TOKENS_CPU if self._device.type == "cpu" else PREFILL_OVERHEAD_TOKENS_ACCELERATOR
        groups = plan_prefill_groups([len(s.prompt_ids) for s in slots], overhead, PREFILL_TOKEN_BUDGET)
        for group in groups:
            self._admit_group([slots[i] for i in group])

    def _admit_group(self, slots: list[_Slot]) -> None:
        """Prefill `slots` together, sample their first tokens and merge the live ones into the batch."""
        try:
            new = self._prefill(slots)
        except Exception as error:  # this prompt's problem (e.g. out of memory): the running batch carries on
            self._fail_prefill(slots, error)
            return
        try:
            self._emit_and_retire(new)
            if len(new):
                merge_batches(self._batch, new)
        except Exception as error:
            self._fail_running(error, extra=new.slots)

    def _prefill(self, slots: list[_Slot]) -> _Batch:
        import torch

        device = self._device
        longest = max(len(s.prompt_ids) for s in slots)
        pad = self._pad_token_id()
        ids = torch.full((len(slots), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(slots), longest), dtype=torch.long)
        positions = torch.zeros((len(slots), longest), dtype=torch.long)
        for row, slot in enumerate(slots):
            n = len(slot.prompt_ids)
            ids[row, longest - n :] = torch.tensor(slot.prompt_ids, dtype=torch.long)
            mask[row, longest - n :] = 1
            positions[row, longest - n :] = torch.arange(n)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        cache = new_cache(self.model.config)
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        new = _Batch()
        new.slots, new.cache, new.mask = list(slots), cache, mask
        new.positions = mask.sum(1)  # the next token's position: the prompt length
        new.next_tokens = self._choose(new.slots, output.logits[:, -1, :]).to(device)
        return new

    def _step(self) -> None:
        import torch

        batch = self._batch
        try:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
            output = self.model(
                input_ids=batch.next_tokens[:, None],
                attention_mask=batch.mask,
                position_ids=batch.positions[:, None],
                cache=batch.cache,
                use_cache=True,
            )
            batch.positions = batch.positions + 1
            batch.next_tokens = self._choose(batch.slots, output.logits[:, -1, :]).to(self._device)
            self.steps += 1
            self.max_rows_seen = max(self.max_rows_seen, len(batch))
            self._emit_and_retire(batch)
        except Exception as error:
            self._fail_running(error)

    def _plan_prompt_chunks(self) -> list[tuple[_Slot, int]]:
        """The prompt chunks of the next pass, as (slot, end), at most `pass_prompt_tokens` tokens in all.

        Shortest remaining prompt first, each whole while it fits. A prompt longer than the budget is split over
        passes (chunked prefill), but only in a pass that completes no other prompt: a chunk riding along would
        delay those prompts' first tokens for nothing (its own first token is passes away anyway).
        """
        cancelled = [slot for slot in self._prefilling if slot.cancelled]
        if cancelled:
            self._prefilling = [slot for slot in self._prefilling if not slot.cancelled]
            self._release(cancelled)
        budget = self.pass_prompt_tokens
        chunks: list[tuple[_Slot, int]] = []
        for slot in sorted(self._prefilling, key=lambda s: len(s.prompt_ids) - s.prefilled):
            remaining = len(slot.prompt_ids) - slot.prefilled
            if remaining <= budget:
                chunks.append((slot, len(slot.prompt_ids)))
                budget -= remaining
            else:
                if not chunks:
                    chunks.append((slot, slot.prefilled + budget))
                break
        return chunks

    def _pass(self, chunks: list[tuple[_Slot, int]], with_running: bool = True) -> None:
        """One lean forward (LlamaDecoder): the running rows' next tokens and the prompt chunks together.

        A slot whose chunk ends its prompt gets its first token from the prompt's last logits and joins the batch
        after the pass. If the pass fails, nobody knows whose fault it was: every cache it touched is rolled back,
        the running rows run a pass alone, then each chunk alone, so a failure stays with the request causing it.
        """
        import torch

        from inference.fast_decode import DecodeRows, PromptRow

        batch = self._batch
        decode = None
        if with_running and len(batch):
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
            decode = DecodeRows(batch.next_tokens, batch.positions, mask, batch.cache)
            lengths = [layer.keys.shape[-2] for layer in _cache_layers(batch.cache)]
        if decode is None and not chunks:
            return
        config, device = self.model.config, self._device
        for slot, end in chunks:
            if slot.prompt is None:
                slot.prompt = PromptRow(
                    torch.tensor(slot.prompt_ids, dtype=torch.long, device=device), new_cache(config)
                )
            slot.prompt.start, slot.prompt.end = slot.prefilled, end
        try:
            decode_logits, prompt_logits = self._decoder.forward(decode, [slot.prompt for slot, _ in chunks])
        except Exception as error:
            if decode is not None:
                _truncate_cache(batch.cache, lengths)
            for slot, _ in chunks:  # back to what the cache held before the pass
                if slot.prefilled:
                    _truncate_cache(slot.prompt.cache, [slot.prefilled] * len(_cache_layers(slot.prompt.cache)))
                else:
                    slot.prompt.cache = new_cache(config)
            if decode is not None and chunks:
                self._pass([])
                for chunk in chunks:
                    self._pass([chunk], with_running=False)
            elif decode is not None:
                self._fail_running(error)
            elif len(chunks) > 1:
                for chunk in chunks:
                    self._pass([chunk], with_running=False)
            else:
                slot = chunks[0][0]
                self._prefilling.remove(slot)
                slot.prompt = None
                self._fail_prefill([slot], error)
            return
        completed = [(row, slot) for row, (slot, end) in enumerate(chunks) if end == len(slot.prompt_ids)]
        try:
            if decode is not None:
                batch.mask = decode.mask
                batch.positions = batch.positions + 1
                batch.next_tokens = self._choose(batch.slots, decode_logits).to(self._device)
                self.steps += 1
                self.max_rows_seen = max(self.max_rows_seen, len(batch))
                self._emit_and_retire(batch)
            for slot, end in chunks:
                slot.prefilled = end
            if completed:
                done = [slot for _, slot in completed]
                self._prefilling = [slot for slot in self._prefilling if slot not in done]
                rows = torch.tensor([row for row, _ in completed], device=prompt_logits.device)
                first_tokens = self._choose(done, prompt_logits.index_select(0, rows)).to(self._device)
                joining: list[_Batch] = []
                for row, slot in enumerate(done):
                    new = _Batch()
                    new.slots, new.cache = [slot], slot.prompt.cache
                    slot.prompt = None
                    new.mask = torch.ones((1, len(slot.prompt_ids)), dtype=torch.long, device=self._device)
                    new.positions = torch.tensor([len(slot.prompt_ids)], dtype=torch.long, device=self._device)
                    new.next_tokens = first_tokens[row : row + 1]
                    self._emit_and_retire(new)
                    joining.append(new)
                merge_batches(self._batch, *joining)
        except Exception as error:
            extra = [slot for slot, _ in chunks]
            self._prefilling = [slot for slot in self._prefilling if slot not in extra]
            self._fail_running(error, extra=extra)

    def _fail_prefill(self, slots: list[_Slot], error: Exception) -> None:
        logger.error("prefill failed for %d request(s)", len(slots), exc_info=error)
        self._release(slots)
        self._post_many((slot, GenerationFailed(f"generation failed: {type(error).__name__}")) for slot in slots)

    def _fail_running(self, error: Exception, extra: Iterable[_Slot] = ()) -> None:
        logger.exception("batched generation failed; failing the running requests")
        slots = list(dict.fromkeys([*self._batch.slots, *extra]))
        self._batch.clear()
        self._release(slots)
        self._post_many((slot, GenerationFailed(f"generation failed: {type(error).__name__}")) for slot in slots)

    def _emit_and_retire(self, batch: _Batch) -> None:
        """Send each row its new token (one host copy for the whole batch), then drop the rows that ended."""
        tokens: list[int] = batch.next_tokens.tolist()
        terminators = self._terminator_set
        events: list[tuple[_Slot, Any]] = []
        keep: list[int] = []
        ended: list[_Slot] = []
        for row, (slot, token) in enumerate(zip(batch.slots, tokens, strict=True)):
            if slot.cancelled:
                ended.append(slot)
                continue
            if token in terminators:
                events.append((slot, _Done("stop")))
                ended.append(slot)
                continue
            slot.generated += 1
            self.generated_tokens_total += 1
            events.append((slot, token))
            if slot.history:
                slot.history.append(token)
            if slot.generated >= slot.request.max_new_tokens:
                events.append((slot, _Done("length")))
                ended.append(slot)
                continue
            keep.append(row)
        try:
            if ended:  # free the rows first, so a client that has its result sees the capacity back
                keep_rows(batch, keep)
                self._release(ended)
        finally:
            self._post_many(events)

    def _choose(self, slots: list[_Slot], logits: Any) -> Any:
        """The next token of every row: greedy rows take the argmax, the others sample with their own generator."""
        import torch

        scores = logits.float()
        for row, slot in enumerate(slots):
            penalty = slot.request.repetition_penalty
            if penalty is not None and penalty != 1.0 and slot.history:
                seen = torch.tensor(slot.history, device=scores.device)
                picked = scores[row].gather(0, seen)
                picked = torch.where(picked < 0, picked * penalty, picked / penalty)
                scores[row].scatter_(0, seen, picked)
        tokens = scores.argmax(dim=-1)
        for row, slot in enumerate(slots):
            if slot.greedy:
                continue
            if slot.generator is None:
                slot.generator = torch.Generator(device=scores.device)
                if slot.request.seed is not None:
                    slot.generator.manual_seed(slot.request.seed)
                else:
                    slot.generator.seed()
            tokens[row] = _sample(scores[row], slot.request, slot.generator)
        return tokens


def _truncate_cache(cache: Any, lengths: list[int]) -> None:
    """Put each layer back to `lengths` columns (undoes a failed pass's appends; the buffers are kept)."""
    for layer, length in zip(_cache_layers(cache), lengths, strict=True):
        if layer.keys is not None and layer.keys.shape[-2] > length:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def plan_prefill_groups(lengths: list[int], overhead: int, budget: int) -> list[list[int]]:
    """Split prompts (by index) into left-padded prefill batches that cost the least.

    A batch costs `overhead` (a forward pass's fixed cost, in prompt-token equivalents) plus rows x its
    longest prompt (padding included), and holds at most `budget` padded tokens unless it is one prompt
    (this bounds the prefill's activation memory). Prompts are sorted by length, so the best split is
    into contiguous runs (an O(n^2) dynamic programme); groups come shortest first, so short prompts see
    their first token soonest.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):
            padded = (end - start) * sorted_lengths[end - 1]
            if padded > budget and end - start > 1:
                break
            cost = best[start] + overhead + padded
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def _sample(scores: Any, request: GenerationRequest, generator: Any) -> Any:
    """One token from one row of logits: temperature, top-k, top-p (as transformers' warpers), then a draw."""
    import torch

    if request.temperature != 1.0:
        scores = scores / request.temperature
    if request.top_k is not None and request.top_k > 0:
        k = min(request.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if request.top_p is not None and request.top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - request.top_p)
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, sorted_index, remove), -math.inf)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _deliver(events: list[tuple[_Slot, Any]]) -> None:
    for slot, event in events:
        slot.queue.put_nowait(event)
