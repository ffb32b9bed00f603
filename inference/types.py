"""The seam between the web layer and the engines: plain dataclasses and typed errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]
EngineState = Literal["loading", "ready", "failed", "unavailable", "stopping"]  # unavailable: remote upstream down
ENGINE_STATES: tuple[EngineState, ...] = get_args(EngineState)  # for metrics, the /ready schema and the page


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class ResponseFormat:
    """Constrained decoding: every token is masked so the reply parses as JSON (`json_object`) or validates against
    `schema` (`json_schema`, the JSON Schema as JSON text: hashable, the compiled grammar's cache key)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None
    strict: bool = True
    name: str = field(default="response", compare=False)  # json_schema.name: forwarded upstream, not a cache key


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the full conversation (system, history, new user turn) and its sampling knobs.

    `prompt` set (and `messages` empty) is a raw completion: the text is the model's input as it is, no chat
    template (`/v1/completions`). Per-row knobs (penalties, `min_p`, `logprobs`, `response_format`) live with that
    request's row inside a batched pass; the rows that do not use them take the plain path.
    """

    messages: tuple[Message, ...]
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 (anything below 1e-5) means greedy decoding
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    request_id: str = ""
    prompt: str | None = None  # raw completion text instead of messages
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence of the token in the output so far
    min_p: float | None = None  # drop tokens below min_p x the top token's probability
    logprobs: int | None = None  # None: off; k (0-20): each token's logprob and the k most likely alternatives
    response_format: ResponseFormat | None = None
    # Who asked, for fair admission (round-robin across clients, MAX_RUNNING_PER_KEY): an opaque, non-secret name
    # the web layer sets (`key-2`: the second configured API key); None, requests without a key, share one identity.
    client: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (natural log) and the most likely alternatives at that step."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A piece of newly generated text, ready to show; with `logprobs` requested, the tokens it covers."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """The totals that end every stream."""

    text: str
    input_length: int  # prompt tokens after templating
    output_length: int  # generated tokens, the terminator excluded
    finish_reason: FinishReason
    time_to_first_token_s: float | None = None
    duration_s: float = 0.0
    # The requested stop sequence the reply ended on (finish_reason "stop"); None: a terminator, the length limit,
    # or a remote upstream that does not say which (vLLM does, in `stop_reason`).
    stop_sequence: str | None = None


StreamEvent = TextDelta | GenerationResult


@dataclass(frozen=True)
class ModelInfo:
    """What is being served, for responses, the UI banner and metrics."""

    model_id: str
    quantization: str
    dtype: str
    device: str
    context_length: int
    is_embedded_demo: bool
    engine: str = "sequential"
    decode_path: str = (
        "transformers"  # the CPU forward path in force (inference/cpu/paths.py), or on a GPU transformers
    )
    cpu_isa: str = (
        ""  # the instruction-set class the CPU path uses (inference/cpu/paths.py isa_in_force); empty on a GPU
    )
    extra: dict[str, str] = field(default_factory=dict)


class InferenceError(Exception):
    """Base of every error the engines raise on purpose; the message is safe to show to a client."""


class InvalidRequest(InferenceError):
    """The request cannot be served as asked (bad roles, a template that rejects the conversation). `param`: the
    request field it is about, where there is one (the web layer names it in the 400)."""

    param: str | None = None  # a subclass may name its field once, as a class attribute

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class ContextTooLong(InvalidRequest):
    param = "messages"  # as OpenAI names it; a route whose prompt is another field renames it (webapp.api)

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        super().__init__(
            f"prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"together {prompt_tokens + max_new_tokens}, above the model's context of {context_length} tokens"
        )


class EngineNotReady(InferenceError):
    """The model is still loading, failed to load, or the service is shutting down."""


class EngineBusy(InferenceError):
    """The queue is full or the wait for a slot ran out; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class GenerationFailed(InferenceError):
    """The model raised while generating; the engine stays usable."""


class UpstreamError(InferenceError):
    """The remote engine's upstream failed: a 5xx answer, a broken or cut stream, a timeout mid-generation."""


class ModelLoadError(InferenceError):
    """The model could not be loaded; the message says what to set."""
