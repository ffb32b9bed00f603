"""ENGINE=batched, continuous batching: one decode loop in one thread serves every running request in shared passes.

How it works
- `submit` validates, then admits the request into a bounded waiting queue (`MAX_QUEUE`); a full queue
  is `EngineBusy` before any response byte, and a request that waits longer than `QUEUE_TIMEOUT` ends
  with `EngineBusy` too. The queue is one FIFO per client (`GenerationRequest.client`, the API key), taken
  round-robin (`inference.engines.fair_queue`), and a client at `MAX_RUNNING_PER_KEY` running keeps waiting while
  the others are admitted: one key flooding the service cannot starve the rest.
- The decode thread owns the model. Each iteration it first admits waiting requests into free slots
  (at most `MAX_BATCH` running), then hands them to its `BatchRunner` (`runner.py`), which prefills them and
  runs one pass over every running row (one token each). The batch's KV cache is in `kv_cache.py`, pass planning
  in `scheduling.py`, per-row sampling in `inference.sampling.sampler`.
- Token ids go to each request's asyncio queue; the consumer side detokenizes them with the same
  `TextStreamer` logic as the sequential engine and applies stop sequences (`inference.text.reply.ReplyAssembler`),
  so greedy texts match.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from inference.cpu.passes import LeanPass
from inference.cpu.paths import CpuPath, DecodePath
from inference.engines.base import LocalEngine
from inference.engines.batched.runner import BatchRunner, Done, Slot
from inference.engines.batched.scheduling import AUTO_MAX_BATCH_ACCELERATOR, AUTO_MAX_BATCH_CPU, PREFILL_TOKEN_BUDGET
from inference.engines.fair_queue import FairQueue
from inference.model.loading import LoadedModel, load_model
from inference.sampling.logprobs import ScoredToken, token_logprob
from inference.settings import EngineSettings
from inference.text.reply import ReplyAssembler
from inference.types import EngineBusy, EngineNotReady, GenerationRequest, InferenceError, StreamEvent

logger = logging.getLogger(__name__)


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


class BatchedEngine(LocalEngine):
    """Continuous (iteration-level) batching over the model, in one decode thread."""

    name = "batched"

    def __init__(self, settings: EngineSettings, loader: Callable[[EngineSettings], LoadedModel] = load_model) -> None:
        super().__init__(settings, loader)
        self.max_batch = 8 if settings.max_batch == "auto" else settings.max_batch  # "auto" is settled at load
        self.max_queue = settings.max_queue
        self.queue_timeout_s = settings.queue_timeout
        self._cond = threading.Condition()
        self.max_running_per_client = settings.max_running_per_key  # 0: no cap
        self._waiting: FairQueue[Slot] = FairQueue()  # round-robin across clients, FIFO within one
        self._active = 0  # admitted and not yet finished (being prefilled or in the batch)
        self._running_by_client: collections.Counter[str | None] = collections.Counter()  # of the `_active` ones
        self._admitted: set[Slot] = set()  # the `_active` ones, so a slot released twice is counted off once
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._mean_duration_s = 10.0  # running estimate of one request's time in the batch, for Retry-After
        self.runner = BatchRunner(
            self._release, self._post_many, self._count_tokens
        )  # the decode thread's batch and passes

    # ---- lifecycle -------------------------------------------------------------------------------------

    def on_loaded(self) -> None:
        device = self.model.get_input_embeddings().weight.device
        if self.settings.max_batch == "auto":
            self.max_batch = AUTO_MAX_BATCH_CPU if device.type == "cpu" else AUTO_MAX_BATCH_ACCELERATOR
        lean_pass = lean_pass_for(self.cpu_path, self.model, self.settings.fast_decode)
        prefixes = None
        if lean_pass is not None and self.cpu_path.name == DecodePath.NATIVE and self.settings.prefix_cache_tokens:
            from inference.engines.batched.prefix_cache import PrefixCache

            prefixes = PrefixCache(self.settings.prefix_cache_tokens)  # exact on the native path only
        self.runner.attach(self.model, device, lean_pass, self.terminators, self._pad_token_id(), prefixes)
        self.runner.prefill_chunk_tokens = self.settings.prefill_chunk_tokens
        logger.debug("passes run on %s", type(lean_pass).__name__ if lean_pass else "transformers' forward")

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
            waiting = self._waiting.take_all()
            self._cond.notify_all()
        self._post_many((slot, EngineNotReady("the service is shutting down")) for slot in waiting)
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

    @property
    def lean_pass(self) -> LeanPass | None:
        """What runs each iteration as one pass (`lean_pass_for`), else None: transformers' forward."""
        return self.runner.lean_pass

    def runs_transformers_forward(self) -> bool:
        return self.runner.lean_pass is None

    def prefill_shape(self) -> tuple[int, int]:
        if self.runner.lean_pass is not None:  # prompt chunks of at most PASS_PROMPT_TOKENS ride each pass
            return self.runner.pass_prompt_tokens, self.runner.pass_prompt_tokens
        return self.settings.prefill_chunk_tokens, PREFILL_TOKEN_BUDGET

    @property
    def reused_prompt_tokens_total(self) -> int:
        prefixes = self.runner.prefixes
        return 0 if prefixes is None else prefixes.hit_tokens

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        prompt_ids = self.prepare(request)
        loop = asyncio.get_running_loop()
        slot = Slot(
            request=request,
            prompt_ids=prompt_ids,
            loop=loop,
            queue=asyncio.Queue(),
            submitted_at=time.perf_counter(),
            grammar=self.grammar_for(request),
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
            self._waiting.push(request.client, slot)
            self._cond.notify()
        stream = self._stream(slot)
        weakref.finalize(stream, self._cancel, slot)  # a stream dropped before it is iterated frees its slot
        return stream

    def _retry_after_s(self) -> int:
        rounds = (len(self._waiting) + 1) / max(1, self.max_batch)
        return max(1, min(60, math.ceil(self._mean_duration_s * rounds)))

    def _cancel(self, slot: Slot) -> None:
        slot.cancelled = True
        with self._cond:
            self._waiting.remove(slot.request.client, slot)  # False: not waiting any more

    async def _stream(self, slot: Slot) -> AsyncIterator[StreamEvent]:
        request = slot.request
        collector = _collector_class()(self.tokenizer)
        reply = ReplyAssembler(request.stop, slot.submitted_at)
        consumed = 0
        finish = "stop"
        try:
            while True:
                event = await slot.queue.get()
                if isinstance(event, int):
                    consumed += 1
                    pieces = collector.feed(event)
                elif isinstance(event, ScoredToken):  # a row with logprobs
                    consumed += 1
                    reply.add_tokens([token_logprob(self.tokenizer, event)])
                    pieces = collector.feed(event.token)
                elif isinstance(event, Done):
                    finish = event.finish_reason
                    pieces = collector.finish()
                else:
                    raise event
                for piece in pieces:
                    delta = reply.feed(piece)
                    if delta is not None:
                        yield delta
                    if reply.stopped:
                        break
                if reply.stopped:
                    finish = "stop"
                    self._cancel(slot)
                    break
                if isinstance(event, Done):
                    break
            tail = reply.flush()
            if tail is not None:
                yield tail
        finally:
            self._cancel(slot)  # a consumer that leaves early frees its row at the next step
        result = reply.result(len(slot.prompt_ids), consumed, "stop" if finish == "stop" else "length")
        self.report_result(request, result)
        yield result

    # ---- thread -> event loop --------------------------------------------------------------------------

    def _post_many(self, items: Iterable[tuple[Slot, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Slot, Any]]] = {}
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

        runner = self.runner
        try:
            with torch.inference_mode():
                while True:
                    newcomers = self._take_newcomers()
                    if newcomers is None:
                        break
                    runner.run_once(newcomers)
        except BaseException:  # never expected; keep the service honest about it
            logger.exception("the batched decode loop died")
            self.state, self.state_reason = "failed", "the decode loop stopped unexpectedly"
            raise
        finally:
            self._fail_all(EngineNotReady("the service is shutting down"))

    def _take_newcomers(self) -> list[Slot] | None:
        """Waiting requests for the free rows (blocks while there is nothing to do); None to stop."""
        with self._cond:
            while not self._stopping and not self._waiting and self.runner.idle:
                self._cond.wait()
            if self._stopping:
                return None
            now = time.perf_counter()
            stale = self._waiting.drop_stale(lambda s: s.cancelled or now - s.submitted_at > self.queue_timeout_s)
            expired = [slot for slot in stale if not slot.cancelled]
            newcomers: list[Slot] = []
            while self._active < self.max_batch:
                slot = self._waiting.peek(self._has_room)
                if slot is None:  # nothing waiting, or only clients at their MAX_RUNNING_PER_KEY
                    break
                if not slot.cancelled and not self._fits_memory(slot, newcomers):
                    break  # it keeps its turn and waits for running rows to end (or QUEUE_TIMEOUT's 503)
                self._waiting.pop(self._has_room)
                if slot.cancelled:
                    continue
                slot.admitted_at = now
                newcomers.append(slot)
                self._active += 1
                self._admitted.add(slot)
                self._running_by_client[slot.request.client] += 1
        if expired:
            message = (
                f"the request waited {self.queue_timeout_s:g} s for a free slot or for memory for its KV cache "
                "(QUEUE_TIMEOUT); retry shortly"
            )
            self._post_many((slot, EngineBusy(message, retry_after_s=self._retry_after_s())) for slot in expired)
        return newcomers

    def _fits_memory(self, slot: Slot, newcomers: list[Slot]) -> bool:
        """Whether `slot` fits the memory budget beside the admitted rows (MEMORY_CHECK; decode thread, under `_cond`):
        the batch's padded KV cache with it, plus the prefill of every prompt not yet prefilled."""
        if self.memory is None:
            return True
        rows = [*self._admitted, slot]  # the newcomers of this round are admitted already
        prompts = [len(s.prompt_ids) for s in (*self.runner.prefilling, *newcomers, slot)]
        return self.memory.fits([len(s.prompt_ids) + s.request.max_new_tokens for s in rows], prompts)

    def _has_room(self, client: str | None) -> bool:
        """Whether `client` may start one more request (MAX_RUNNING_PER_KEY; called under `_cond`)."""
        cap = self.max_running_per_client
        return cap == 0 or self._running_by_client[client] < cap

    def _release(self, slots: list[Slot]) -> None:
        if not slots:
            return
        now = time.perf_counter()
        with self._cond:
            self._active = max(0, self._active - len(slots))
            for slot in slots:
                if slot in self._admitted:
                    self._admitted.discard(slot)
                    self._running_by_client[slot.request.client] -= 1
                    if not self._running_by_client[slot.request.client]:
                        del self._running_by_client[slot.request.client]
        for slot in slots:
            if slot.admitted_at is not None and not slot.cancelled:
                self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * (now - slot.admitted_at)

    def _count_tokens(self, count: int) -> None:
        self.generated_tokens_total += count

    def _fail_all(self, error: InferenceError) -> None:
        slots = self.runner.drop_all()
        with self._cond:
            slots += self._waiting.take_all()
            self._active = 0
            self._admitted.clear()
            self._running_by_client.clear()
        self._post_many((slot, error) for slot in slots)


def lean_pass_for(path: CpuPath | None, model: Any, fast_decode: bool) -> LeanPass | None:
    """What runs an iteration as one pass for the CPU path in force (inference/cpu/paths.py decides it): the native
    forward (`native`), the lean Llama forward (`lean`), or None (transformers' forward, a prefill and a step per
    iteration)."""
    if path is None or not fast_decode:
        return None
    if path.name == DecodePath.NATIVE:
        from inference.cpu.native_forward import native_forward_of

        return native_forward_of(model)
    if path.name == DecodePath.LEAN:
        from inference.cpu.lean_forward import LeanForward

        return LeanForward(model) if LeanForward.supports(model) else None
    return None


def _deliver(events: list[tuple[Slot, Any]]) -> None:
    for slot, event in events:
        slot.queue.put_nowait(event)
