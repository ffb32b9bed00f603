"""Engines: one streaming call, `submit(request)`, that yields text deltas and ends with the totals.

`submit` validates and admits the request before it returns, so a bad request or a full queue is
an error the caller can answer with a status code before any response byte is sent; iterating the
returned stream then does the generation.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from inference.loading import LoadedModel, load_model
from inference.prompt import PromptBuilder, resolve_terminators
from inference.settings import EngineSettings
from inference.text import StopMatcher
from inference.types import (
    ContextTooLong,
    EngineBusy,
    EngineNotReady,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    ModelInfo,
    StreamEvent,
    TextDelta,
)

logger = logging.getLogger(__name__)

EngineState = Literal["loading", "ready", "failed", "unavailable", "stopping"]  # unavailable: remote upstream down
ResultListener = Callable[[GenerationRequest, GenerationResult], None]

# Temperatures below this decode greedily: dividing logits by a subnormal temperature (5e-324 is valid
# JSON and within 0..2) overflows to inf and the sampler raises on the NaN probabilities.
GREEDY_BELOW_TEMPERATURE = 1e-5


class Engine(ABC):
    """What the web layer talks to: lifecycle, model info and one streaming generation call."""

    def __init__(self) -> None:
        self.state: EngineState = "loading"
        self.state_reason = "model is loading"
        self.info: ModelInfo | None = None
        # Every token the model produced, cancelled generations included (observability, tests).
        self.generated_tokens_total = 0
        self.load_duration_s: float | None = None  # set once the model is loaded
        self._result_listeners: list[ResultListener] = []

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def queue_depth(self) -> int:
        """Admitted generations waiting for the model."""
        return 0

    @property
    def running(self) -> int:
        """Generations the model is working on now."""
        return 0

    @property
    def idle(self) -> bool:
        return self.queue_depth == 0 and self.running == 0

    def add_result_listener(self, listener: ResultListener) -> None:
        """Call `listener(request, result)` for every finished generation (metrics, request logs).

        Engines call it from the stream iterator, just before yielding the GenerationResult, so it runs
        in the consumer's context; a listener must be quick and must not raise (errors are logged).
        """
        self._result_listeners.append(listener)

    def remove_result_listener(self, listener: ResultListener) -> None:
        if listener in self._result_listeners:
            self._result_listeners.remove(listener)

    def report_result(self, request: GenerationRequest, result: GenerationResult) -> None:
        for listener in self._result_listeners:
            try:
                listener(request, result)
            except Exception:
                logger.exception("a result listener failed")

    def drain(self, reason: str = "the service is shutting down") -> None:
        """Stop admitting new work (submit raises EngineNotReady); admitted generations run to the end."""
        if self.state in ("loading", "ready"):
            self.state, self.state_reason = "stopping", reason

    def ensure_ready(self) -> ModelInfo:
        if self.state != "ready" or self.info is None:
            raise EngineNotReady(self.state_reason)
        return self.info

    @abstractmethod
    def load(self) -> None:
        """Blocking load; sets `state` to ready or failed."""

    async def start(self) -> None:
        """Load in a worker thread so the event loop keeps serving (health checks, 503s) meanwhile."""
        await asyncio.to_thread(self.load)

    @abstractmethod
    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Validate and admit `request`; the returned iterator yields TextDelta... then one GenerationResult."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole generation at once."""
        stream = await self.submit(request)
        async for event in stream:
            if isinstance(event, GenerationResult):
                return event
        raise GenerationFailed("the generation ended without a result")

    def close(self) -> None:
        self.state = "stopping"
        self.state_reason = "the service is shutting down"


class LocalEngine(Engine, ABC):
    """An engine that runs a transformers model in this process."""

    name = "local"

    def __init__(self, settings: EngineSettings, loader: Callable[[EngineSettings], LoadedModel] = load_model) -> None:
        super().__init__()
        self.settings = settings
        self._loader = loader
        self.model: Any = None
        self.tokenizer: Any = None
        self.prompt_builder: PromptBuilder | None = None
        self.terminators: list[int] = []

    def load(self) -> None:
        """Blocking load, on the thread that will run the model (see `run_on_model_thread`)."""
        self.run_on_model_thread(self._load_here)

    def run_on_model_thread(self, work: Callable[[], None]) -> None:
        """Run `work` on the engine's model thread and wait for it (here: the calling thread).

        Why one thread does both the loading and the forward passes: torch's CPU kernels run on OpenMP
        (libgomp), and every thread that ever ran a parallel region keeps its own team of worker threads.
        Once the process holds more OpenMP threads than CPUs (say the team of the thread that loaded the
        model plus the team of the thread that generates), libgomp stops spin-waiting between parallel
        regions and every region waits for a futex wake-up: forward passes ran ~1.6x slower on the 2-core
        CPU (38 ms vs 61 ms per decoding step, `bench/cpu_kernels.py --omp`).
        """
        work()

    def _load_here(self) -> None:
        started = time.perf_counter()
        try:
            loaded = self._loader(self.settings)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self.prompt_builder = PromptBuilder(self.tokenizer)
            self.terminators = resolve_terminators(self.tokenizer)
            self.info = dataclasses.replace(loaded.info, engine=self.name)
            self.on_loaded()
        except Exception as error:
            self.state, self.state_reason = "failed", f"model failed to load: {error}"
            raise
        self.load_duration_s = time.perf_counter() - started
        if self.state == "loading":  # not drained meanwhile
            self.state, self.state_reason = "ready", "ready"

    def on_loaded(self) -> None:
        """Hook for engines that set up more after the model is in memory."""

    def prepare(self, request: GenerationRequest) -> list[int]:
        """Prompt ids for `request`, after the context check."""
        info = self.ensure_ready()
        assert self.prompt_builder is not None
        try:
            prompt_ids = self.prompt_builder.build(request.messages)
        except InvalidRequest:
            raise
        except Exception as error:  # a tokenizer fault is this request's problem, not the service's
            logger.warning("prompt tokenization failed (request %s)", request.request_id or "-", exc_info=True)
            raise InvalidRequest(f"the prompt could not be tokenized: {type(error).__name__}") from error
        if len(prompt_ids) + request.max_new_tokens > info.context_length:
            raise ContextTooLong(len(prompt_ids), request.max_new_tokens, info.context_length)
        return prompt_ids

    def sampling_config(self, request: GenerationRequest) -> Any:
        """A GenerationConfig for `request`, starting from the model's own defaults."""
        config = copy.deepcopy(self.model.generation_config)
        greedy = request.temperature < GREEDY_BELOW_TEMPERATURE
        config.update(
            max_new_tokens=request.max_new_tokens,
            do_sample=not greedy,
            temperature=1.0 if greedy else request.temperature,
            top_p=1.0 if greedy or request.top_p is None else request.top_p,
            top_k=None if greedy or request.top_k is None else request.top_k,
            repetition_penalty=request.repetition_penalty or 1.0,
            eos_token_id=self.terminators,
            pad_token_id=self._pad_token_id(),
        )
        return config

    def _pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.terminators[0]


@dataclass
class _Job:
    prompt_ids: list[int]
    request: GenerationRequest
    streamer: Any
    submitted_at: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    output_ids: list[int] = field(default_factory=list)
    phase: Literal["queued", "running", "done"] = "queued"


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


class SequentialEngine(LocalEngine):
    """One `model.generate` at a time, in FIFO order, streamed through TextIteratorStreamer.

    A single worker thread runs every generation, so the model is never run by two threads at once
    and requests are served in arrival order.
    """

    name = "sequential"

    def __init__(self, settings: EngineSettings, loader: Callable[[EngineSettings], LoadedModel] = load_model) -> None:
        super().__init__(settings, loader)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._counts_lock = threading.Lock()
        self._queued = 0
        self._running = 0
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
        with self._admission_lock:
            if self._admitted >= 1 + self.max_queue:
                retry_after = max(1, min(60, math.ceil(self._mean_duration_s * self._admitted)))
                raise EngineBusy(
                    f"the server is busy ({self._admitted - 1} requests waiting); retry shortly",
                    retry_after_s=retry_after,
                )
            self._admitted += 1
        ticket = _Ticket(self._leave)
        stream = self._stream(request, prompt_ids, ticket, time.perf_counter())
        weakref.finalize(stream, ticket.release)  # a stream dropped before it is iterated gives its place back
        return stream

    def _leave(self) -> None:
        with self._admission_lock:
            self._admitted -= 1

    async def _stream(
        self, request: GenerationRequest, prompt_ids: list[int], ticket: _Ticket, submitted_at: float
    ) -> AsyncIterator[StreamEvent]:
        try:
            async for event in self._generate_stream(request, prompt_ids, submitted_at):
                if isinstance(event, GenerationResult):
                    ticket.release()  # done: the caller may keep the finished stream around
                yield event
        finally:
            ticket.release()

    async def _generate_stream(
        self, request: GenerationRequest, prompt_ids: list[int], started: float
    ) -> AsyncIterator[StreamEvent]:
        from transformers import AsyncTextIteratorStreamer

        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        job = _Job(prompt_ids=prompt_ids, request=request, streamer=streamer, submitted_at=started)
        with self._counts_lock:
            self._queued += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._generate_blocking, job)
        matcher = StopMatcher(request.stop)
        parts: list[str] = []
        first_token_at: float | None = None
        try:
            async for piece in streamer:
                text = matcher.feed(piece)
                if text:
                    first_token_at = first_token_at or time.perf_counter()
                    parts.append(text)
                    yield TextDelta(text)
                if matcher.stopped:
                    job.cancel.set()
                    break
            tail = matcher.flush()
            if tail:
                parts.append(tail)
                yield TextDelta(tail)
            await future
        finally:
            job.cancel.set()  # a consumer that leaves early (client gone) frees the model at the next token
            self._move(job, "queued", "done")  # it never reached the model
        output = job.output_ids
        ended_on_terminator = bool(output) and output[-1] in self.terminators
        if ended_on_terminator:
            output = output[:-1]
        finish = "length" if len(output) >= request.max_new_tokens and not matcher.stopped else "stop"
        duration = time.perf_counter() - started
        self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * duration
        result = GenerationResult(
            text="".join(parts),
            input_length=len(prompt_ids),
            output_length=len(output),
            finish_reason=finish,
            time_to_first_token_s=None if first_token_at is None else first_token_at - started,
            duration_s=duration,
        )
        self.report_result(request, result)
        yield result

    def _generate_blocking(self, job: _Job) -> None:
        import torch
        from transformers import StoppingCriteriaList

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
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self.sampling_config(job.request),
                streamer=job.streamer,
                stopping_criteria=StoppingCriteriaList([_CancelCriteria(job.cancel, self)]),
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

    def run_on_model_thread(self, work: Callable[[], None]) -> None:
        self._executor.submit(work).result()

    def close(self) -> None:
        super().close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def build_engine(settings: EngineSettings) -> Engine:
    """The engine the settings ask for."""
    if settings.engine == "sequential":
        return SequentialEngine(settings)
    if settings.engine == "batched":
        from inference.batching import BatchedEngine

        return BatchedEngine(settings)
    if settings.engine == "remote":
        from inference.remote import RemoteEngine  # imports the openai client only in remote mode

        return RemoteEngine(settings)
    raise ValueError(f"unknown ENGINE {settings.engine!r}")
