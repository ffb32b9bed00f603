"""ENGINE=sequential: one `model.generate` at a time, streamed through transformers' streamer.

The waiting requests are taken round-robin across clients, FIFO within one (`inference.engines.fair_queue`).

The baseline engine: the batched one is checked against its greedy texts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from inference.engines.base import Engine, LocalEngine
from inference.engines.fair_queue import FairQueue
from inference.model.loading import LoadedModel, load_model
from inference.model.memory import TRIM_AFTER_TOKENS, release_free_heap
from inference.sampling.logprobs import LogprobRecorder, logprob_streamer
from inference.sampling.penalties import PenaltyProcessor
from inference.sampling.sampler import GREEDY_BELOW_TEMPERATURE, choose, uses_penalties
from inference.settings import EngineSettings
from inference.text.reply import ReplyAssembler
from inference.types import EngineBusy, GenerationFailed, GenerationRequest, GenerationResult, StreamEvent

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    prompt_ids: list[int]
    request: GenerationRequest
    streamer: Any
    submitted_at: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    processors: list[Any] = field(
        default_factory=list
    )  # penalties and logprobs (inference.sampling.logprobs), when asked
    phase: Literal["queued", "running", "done"] = "queued"
    grammar: Any = None  # inference.sampling.grammar.RowGrammar of a constrained request (response_format)
    # Its `_generate_blocking` ended (its error, if any): the executor task that ran it may be another job's.
    outcome: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class _Ticket:
    """One admitted request's place in an engine's count, given back exactly once."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class _CancelCriteria:
    """Stops `generate` at the next token once the request is cancelled (disconnect, stop sequence).

    Called once per generated token, so it also counts them.
    """

    def __init__(self, cancel: threading.Event, engine: Engine) -> None:
        self.cancel = cancel
        self.engine = engine

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.engine.generated_tokens_total += 1
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class _GrammarSampler:
    """A constrained request's token choice inside `generate` (its logits processor), and its stop (`stopped`).

    The processor chooses the token exactly as the batched engine does (`sampling.choose`: the grammar's mask first,
    then penalty, temperature, top-k, top-p, with the request's own generator) and hands `generate` a one-hot score
    that `generate`, run greedy, takes: transformers applies its own warpers before a custom processor, so a mask
    applied there could leave no token at all. `stopped`, a stopping criterion, consumes the emitted token and ends
    the generation once the grammar is complete.
    """

    def __init__(self, request: GenerationRequest, grammar: Any) -> None:
        self.request, self.grammar = request, grammar
        self.generator: Any = None
        self.history: list[int] = []
        self.counts: Any = None  # presence/frequency penalties: PenaltyProcessor, ahead of this sampler, applies them
        self.scored: Any = None  # set by `choose` for a request with logprobs (its recorder streams them)

    @property
    def greedy(self) -> bool:
        return self.request.temperature < GREEDY_BELOW_TEMPERATURE

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.request.repetition_penalty not in (None, 1.0):
            self.history = input_ids[0].tolist()
        token = int(choose([self], scores)[0])
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot[0, token] = 0.0
        return one_hot

    def stopped(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = self.grammar.advance(int(input_ids[0, -1]))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class SequentialEngine(LocalEngine):
    """One `model.generate` at a time, streamed through TextIteratorStreamer.

    A single worker thread runs every generation, so the model is never run by two threads at once. The waiting
    requests are served round-robin across clients (`GenerationRequest.client`), each client's in arrival order, so
    one API key flooding the service cannot starve the others: each submit queues its job in a `FairQueue` and one
    task on the worker, and each task runs the job next in the rotation, not necessarily its own.
    """

    name = "sequential"

    def __init__(self, settings: EngineSettings, loader: Callable[[EngineSettings], LoadedModel] = load_model) -> None:
        super().__init__(settings, loader)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._counts_lock = threading.Lock()
        self._queued = 0
        self._running = 0
        self._jobs: FairQueue[_Job] = FairQueue()  # queued jobs, under `_counts_lock`; one worker task for each
        # Admission (MAX_QUEUE) counts from submit(), before the stream is first iterated.
        self.max_queue = settings.max_queue
        self.queue_timeout_s = settings.queue_timeout
        self._admitted = 0  # the running request plus the waiting ones
        self._admission_lock = threading.Lock()
        self._mean_duration_s = 10.0  # running estimate of one generation's time, for Retry-After

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    def _move(self, job: _Job, frm: str, to: Literal["running", "done"]) -> bool:
        """Move `job` from phase `frm` to `to`, keeping the counts; False if it was not in `frm`."""
        with self._counts_lock:
            if job.phase != frm:
                return False
            if frm == "queued":
                self._queued -= 1
            elif frm == "running":
                self._running -= 1
            if to == "running":
                self._running += 1
            job.phase = to
            return True

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        prompt_ids = self.prepare(request)
        grammar = self.grammar_for(request)
        with self._admission_lock:
            if self._admitted >= 1 + self.max_queue:
                retry_after = max(1, min(60, math.ceil(self._mean_duration_s * self._admitted)))
                raise EngineBusy(
                    f"the server is busy ({self._admitted - 1} requests waiting); retry shortly",
                    retry_after_s=retry_after,
                )
            self._admitted += 1
        ticket = _Ticket(self._leave)
        stream = self._stream(request, prompt_ids, ticket, time.perf_counter(), grammar)
        weakref.finalize(stream, ticket.release)  # a stream dropped before it is iterated gives its place back
        return stream

    def _leave(self) -> None:
        with self._admission_lock:
            self._admitted -= 1

    async def _stream(
        self, request: GenerationRequest, prompt_ids: list[int], ticket: _Ticket, submitted_at: float, grammar: Any
    ) -> AsyncIterator[StreamEvent]:
        try:
            async for event in self._generate_stream(request, prompt_ids, submitted_at, grammar):
                if isinstance(event, GenerationResult):
                    ticket.release()  # done: the caller may keep the finished stream around
                yield event
        finally:
            ticket.release()

    async def _generate_stream(
        self, request: GenerationRequest, prompt_ids: list[int], started: float, grammar: Any = None
    ) -> AsyncIterator[StreamEvent]:
        from transformers import AsyncTextIteratorStreamer

        processors: list[Any] = []
        if uses_penalties(request):
            processors.append(PenaltyProcessor(request, len(prompt_ids)))
        if request.logprobs is not None:
            recorder = LogprobRecorder(request.logprobs)
            processors.append(recorder)  # after the penalties: it records what `choose` scores in the batched engine
            streamer = logprob_streamer(self.tokenizer, recorder, self.terminators)
        else:
            streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        job = _Job(prompt_ids=prompt_ids, request=request, streamer=streamer, submitted_at=started, grammar=grammar)
        job.processors = processors
        take_tokens = getattr(streamer, "take", None)  # logprobs of the tokens generated so far
        with self._counts_lock:
            self._queued += 1
            self._jobs.push(request.client, job)
        asyncio.get_running_loop().run_in_executor(self._executor, self._run_next)
        reply = ReplyAssembler(request.stop, started)
        try:
            async for piece in streamer:
                if take_tokens is not None:
                    reply.add_tokens(take_tokens())
                delta = reply.feed(piece)
                if delta is not None:
                    yield delta
                if reply.stopped:
                    job.cancel.set()
                    break
            if take_tokens is not None and not reply.stopped:
                reply.add_tokens(take_tokens())
            tail = reply.flush()
            if tail is not None:
                yield tail
            await asyncio.wrap_future(job.outcome)
        finally:
            job.cancel.set()  # a consumer that leaves early (client gone) frees the model at the next token
            self._move(job, "queued", "done")  # it never reached the model
        output = job.output_ids
        ended_on_terminator = bool(output) and output[-1] in self.terminators
        if ended_on_terminator:
            output = output[:-1]
        complete = grammar is not None and grammar.done  # the JSON closed on the last token allowed
        finish = "length" if len(output) >= request.max_new_tokens and not reply.stopped and not complete else "stop"
        result = reply.result(len(prompt_ids), len(output), finish)
        self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * result.duration_s
        self.report_result(request, result)
        yield result

    def _generate_blocking(self, job: _Job) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if job.cancel.is_set() or not self._move(job, "queued", "running"):  # the client left while queued
            self._move(job, "queued", "done")
            job.streamer.end()
            return
        waited = time.perf_counter() - job.submitted_at
        if waited > self.queue_timeout_s:
            self._move(job, "running", "done")
            job.streamer.end()
            raise EngineBusy(
                f"the request waited {waited:.0f} s for the model (QUEUE_TIMEOUT={self.queue_timeout_s:g}); "
                "retry shortly",
                retry_after_s=max(1, min(60, math.ceil(self._mean_duration_s))),
            )
        try:
            if job.request.seed is not None:
                torch.manual_seed(job.request.seed)
            input_ids = torch.tensor([job.prompt_ids], device=self.model.device)
            config = self.sampling_config(job.request)
            # The penalties and the logprob recorder first; a constrained request's sampler last (it masks and chooses).
            processors = LogitsProcessorList(job.processors)
            criteria = StoppingCriteriaList([_CancelCriteria(job.cancel, self)])
            if job.grammar is not None:  # response_format: the sampler chooses every token, generate goes greedy
                sampler = _GrammarSampler(job.request, job.grammar)
                config.update(
                    do_sample=False, temperature=1.0, top_p=1.0, top_k=None, min_p=None, repetition_penalty=1.0
                )
                processors.append(sampler)
                criteria.append(sampler.stopped)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                streamer=job.streamer,
                logits_processor=processors,
                stopping_criteria=criteria,
            )
            job.output_ids = output[0, len(job.prompt_ids) :].tolist()
        except Exception as error:
            if job.cancel.is_set():  # the consumer is gone (e.g. the event loop closed at shutdown): no one to tell
                logger.debug("cancelled generation ended with %s", type(error).__name__)
                return
            logger.exception("generation failed (request %s)", job.request.request_id or "-")
            job.streamer.end()
            raise GenerationFailed(f"generation failed: {type(error).__name__}") from error
        finally:
            self._move(job, "running", "done")
            if len(job.prompt_ids) + len(job.output_ids) >= TRIM_AFTER_TOKENS:
                release_free_heap()  # its KV cache and prefill left holes glibc keeps (inference.model.memory)

    def _run_next(self) -> None:
        """One worker task: run the job next in the round-robin across clients. Each job queued one task, and each
        task takes one job, so every job runs; its outcome goes to its own stream, whichever task ran it."""
        with self._counts_lock:
            job = self._jobs.pop()
        if job is None:
            return
        try:
            self._generate_blocking(job)
        except BaseException as error:
            job.outcome.set_exception(error)
        else:
            job.outcome.set_result(None)

    def run_on_model_thread(self, work: Callable[[], None]) -> None:
        self._executor.submit(work).result()

    def close(self) -> None:
        super().close()
        self._executor.shutdown(wait=False, cancel_futures=True)
