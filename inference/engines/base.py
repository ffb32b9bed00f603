"""The engine base: one streaming call, `submit(request)`, that yields text deltas and ends with the totals.

`submit` validates and admits the request before it returns, so a bad request or a full queue is
an error the caller can answer with a status code before any response byte is sent; iterating the
returned stream then does the generation.

`Engine` is what the web layer talks to; `LocalEngine` adds what both in-process engines share (the model,
its prompt builder, the context check). The engines: `sequential`, `batched` and `remote` in this folder;
`factory.build_engine` picks one from the settings.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from inference.cpu.paths import CpuPath
from inference.engines.memory_budget import MemoryBudget
from inference.model import loading
from inference.model.loading import LoadedModel, load_model
from inference.model.memory import gb, pin_mmap_threshold
from inference.sampling.grammar import GrammarCompiler, RowGrammar
from inference.sampling.sampler import GREEDY_BELOW_TEMPERATURE
from inference.settings import EngineSettings
from inference.text.prompt import PromptBuilder, resolve_terminators
from inference.types import (
    ContextTooLong,
    EngineNotReady,
    EngineState,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    ModelInfo,
    StreamEvent,
)

logger = logging.getLogger(__name__)
# Below what this prompt (with as many new tokens) costs, the memory left at ready is logged as a warning.
MODEST_PROMPT_TOKENS = 512

ResultListener = Callable[[GenerationRequest, GenerationResult], None]


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
    def reused_prompt_tokens_total(self) -> int:
        """Prompt tokens taken from the prefix cache instead of computed (PREFIX_CACHE_TOKENS); 0 without one."""
        return 0

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

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens `request` puts before the model (chat template applied, system text included), without
        generating (Anthropic's count_tokens). An engine that cannot count says so (400)."""
        raise InvalidRequest(f"the {type(self).__name__} cannot count prompt tokens")

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
        self.grammars: GrammarCompiler | None = None  # response_format's compiled grammars (set at load)
        self.cpu_path: CpuPath | None = None  # the CPU path in force (set at load; None on a GPU)
        self.memory: MemoryBudget | None = None  # what requests may take (MEMORY_CHECK; set at load)

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
            self.cpu_path = loaded.path
            self.prompt_builder = PromptBuilder(self.tokenizer)
            self.terminators = resolve_terminators(self.tokenizer)
            self.grammars = GrammarCompiler(self.tokenizer, self.terminators, self.model.config.vocab_size)
            self.info = dataclasses.replace(loaded.info, engine=self.name)
            self.on_loaded()
            if self.runs_transformers_forward():
                pin_mmap_threshold()  # its large transients go back to the kernel when freed (inference.model.memory)
            if self.settings.memory_check:
                self.memory = self.memory_budget()
        except Exception as error:
            self.state, self.state_reason = "failed", f"model failed to load: {error}"
            raise
        self.load_duration_s = time.perf_counter() - started
        if self.state == "loading":  # not drained meanwhile
            self.state, self.state_reason = "ready", "ready"

    def on_loaded(self) -> None:
        """Hook for engines that set up more after the model is in memory."""

    def runs_transformers_forward(self) -> bool:
        """Whether prompts go through transformers' forward (not the lean or native passes): those prefills leave the
        heap holes `pin_mmap_threshold` prevents; the native path does not (docs/operations.md#memory)."""
        return True

    def memory_budget(self) -> MemoryBudget:
        """The memory admission's budget, from what is left now that the model is in memory."""
        embedding = self.model.get_input_embeddings().weight
        chunk, group_tokens = self.prefill_shape()
        cuda = embedding.device.type == "cuda"
        budget = MemoryBudget.at_ready(
            self.model.config, embedding.element_size(), lambda: loading.available_memory(cuda), chunk, group_tokens
        )
        modest = budget.cost([2 * MODEST_PROMPT_TOKENS], [MODEST_PROMPT_TOKENS])
        if budget.capacity < modest:  # the operator should know now, not from users' 400s
            logger.warning(
                "memory for requests: %s (%s, less a reserve): a %d-token prompt with as many new tokens needs %s, so "
                "such requests get a 400 until more is free; give the process more memory (MEMORY_CHECK=false skips "
                "the check)",
                gb(budget.capacity),
                budget.where,
                MODEST_PROMPT_TOKENS,
                gb(modest),
            )
        else:
            logger.info("memory for requests: %s (%s, less a reserve)", gb(budget.capacity), budget.where)
        return budget

    def prefill_shape(self) -> tuple[int, int]:
        """(query tokens per prefill forward, 0 for all; the most prompt tokens prefilled together) for the budget."""
        return self.settings.prefill_chunk_tokens, 0

    def prepare(self, request: GenerationRequest) -> list[int]:
        """Prompt ids for `request`, after the context check and the memory check (MEMORY_CHECK)."""
        info = self.ensure_ready()
        prompt_ids = self.prompt_ids(request)
        if len(prompt_ids) + request.max_new_tokens > info.context_length:
            raise ContextTooLong(len(prompt_ids), request.max_new_tokens, info.context_length)
        if self.memory is not None:
            self.memory.check(len(prompt_ids), request.max_new_tokens, idle=self.idle)
        return prompt_ids

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids the model reads for `request`: the chat template applied, or a raw prompt's text."""
        assert self.prompt_builder is not None
        try:
            if request.prompt is not None:
                return self.raw_prompt_ids(request.prompt)
            return self.prompt_builder.build(request.messages)
        except InvalidRequest:
            raise
        except Exception as error:  # a tokenizer fault is this request's problem, not the service's
            logger.warning("prompt tokenization failed (request %s)", request.request_id or "-", exc_info=True)
            param = "prompt" if request.prompt is not None else "messages"
            raise InvalidRequest(f"the prompt could not be tokenized: {type(error).__name__}", param=param) from error

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The length of `prompt_ids`: what `submit` would admit, counted without the context check."""
        self.ensure_ready()
        return len(self.prompt_ids(request))

    def raw_prompt_ids(self, prompt: str) -> list[int]:
        """A raw completion's ids: the text as it is, no chat template; the BOS token where the tokenizer adds one.

        Special tokens written in the text are parsed as such: the client writes the model's whole input here (a
        chat template by hand, say), so there is no turn to forge, unlike message text (see inference.text.prompt).
        """
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InvalidRequest("prompt: the prompt is empty (it gives no tokens)", param="prompt")
        return ids

    def grammar_for(self, request: GenerationRequest) -> RowGrammar | None:
        """The request's own grammar matcher if it asks for structured output (InvalidRequest for a bad schema)."""
        if request.response_format is None:
            return None
        assert self.grammars is not None
        return self.grammars.compile(request.response_format)

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
            min_p=None if greedy or not request.min_p else request.min_p,
            eos_token_id=self.terminators,
            pad_token_id=self._pad_token_id(),
            # generate's own chunked prefill: a long prompt's attention scores are chunk x prompt, not prompt squared
            prefill_chunk_size=self.settings.prefill_chunk_tokens or None,
        )
        return config

    def _pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.terminators[0]
