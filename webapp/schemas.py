"""Every request and response model of the HTTP API, in one place."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from inference import EngineState

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7


def _valid_unicode(value: str) -> str:
    """JSON may carry lone UTF-16 surrogates (`"\\ud800"`); they are not text and no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = ord(value[error.start])
        raise ValueError(
            f"contains an unpaired UTF-16 surrogate (U+{bad:04X}) at character {error.start}: not valid Unicode text"
        ) from None
    return value


# Every string that reaches the tokenizer or comes back in a response.
Text = Annotated[str, AfterValidator(_valid_unicode)]


class RequestModel(BaseModel):
    """Request bodies are validated strictly: `"stream": 0`, `"max_new_tokens": "5"` or `"temperature": true`
    are type errors (400), not values quietly converted. Integers are accepted for number fields, and whole
    numbers written as floats (`5.0`) for integer fields, as JSON Schema defines `integer`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _whole_floats_to_int(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        integer_fields = {name for name, f in cls.model_fields.items() if f.annotation in (int, int | None)}
        return {
            key: int(value) if key in integer_fields and isinstance(value, float) and value.is_integer() else value
            for key, value in data.items()
        }


def _stop_schema(schema: dict[str, Any]) -> None:
    """Document the `stop` rules checked by the validators: non-empty strings, at most 4."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch["maxItems"] = 4
            branch.setdefault("items", {})["minLength"] = 1


def _check_stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty strings")
    for stop in stops:
        _valid_unicode(stop)
    return value


class ChatMessage(RequestModel):
    role: Literal["user", "assistant", "system"] = Field(description="Who said it.")
    content: Text = Field(description="What was said.")


class SamplingParams(RequestModel):
    """Generation knobs shared by the documented endpoints."""

    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS, ge=1, description="Most tokens to generate (capped by MAX_NEW_TOKENS_CAP)."
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2, description="0 is greedy; higher is more random.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Sample from the k most likely tokens.")
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0, description="Above 1 discourages repeats.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Same seed and input give the same text.")
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="Extension (OpenAI's): lowers the logit of every token already generated."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="Extension (OpenAI's): lowers a token's logit per time it was generated."
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="Extension: drop tokens below min_p x the most likely token's probability."
    )
    stop: list[str] | None = Field(
        None,
        max_length=4,
        description="Up to 4 stop sequences; the match is not returned.",
        json_schema_extra=_stop_schema,
    )

    _stops = field_validator("stop")(_check_stops)


class TextGenerationRequest(SamplingParams):
    # The pattern documents the not-blank rule below for clients and fuzzers (JSON Schema `pattern` searches).
    text: Text = Field(description="The user message or prompt.", json_schema_extra={"pattern": r"\S"})
    system_message: Text | None = Field(None, description="Optional system message for the conversation.")
    conversation_history: list[ChatMessage] | None = Field(
        None, description="Earlier messages, oldest first (roles user/assistant/system)."
    )
    stream: bool = Field(
        False, description="Stream the reply as text/event-stream: `delta` events, then one `complete` event."
    )

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be empty")
        return value


class GenerateTextRequest(TextGenerationRequest):
    """Body of `POST /api/v1/generate-text`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"text": "Sopo wae sing ana ing Punakawan?", "max_new_tokens": 256, "temperature": 0.7}]
        }
    )


class ChatRequest(TextGenerationRequest):
    """Body of `POST /api/v1/chat`. `system_message`, if given, replaces the automatic one."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"text": "Ceritakne babagan sejarah Jawa", "max_new_tokens": 512, "temperature": 0.8}]
        }
    )


class GenerateTextResponse(BaseModel):
    """Response of both documented endpoints."""

    generated_text: str
    full_conversation: list[ChatMessage]
    model: str
    input_length: int
    output_length: int


class ErrorResponse(BaseModel):
    detail: str


class HealthResponse(BaseModel):
    status: str


# --- OpenAI-compatible API (/v1) -------------------------------------------------------------


class OpenAITextPart(RequestModel):
    type: Literal["text"]
    text: Text


class OpenAIFunction(RequestModel):
    """A tool's function: `parameters` is the JSON Schema of its arguments (checked in webapp.tool_calls)."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description='The JSON Schema of the arguments, of "type": "object" (none: no arguments).',
        json_schema_extra={"properties": {"type": {"const": "object"}}, "required": ["type"]},
    )
    strict: bool | None = None


class OpenAITool(RequestModel):
    type: Literal["function"]
    function: OpenAIFunction


class OpenAIFunctionName(RequestModel):
    name: str


class OpenAINamedToolChoice(RequestModel):
    type: Literal["function"]
    function: OpenAIFunctionName


class OpenAIFunctionCall(RequestModel):
    name: str
    arguments: Text = Field(description="The arguments as JSON text.")


class OpenAIToolCallIn(RequestModel):
    """A call an earlier assistant message made (history)."""

    id: str
    type: Literal["function"] = "function"
    function: OpenAIFunctionCall


def _message_schema(schema: dict[str, Any]) -> None:
    """Document the per-role rules the validator below checks, as `anyOf` one shape per role (clients, fuzzers)."""
    props = schema["properties"]
    text = {"anyOf": [b for b in props["content"]["anyOf"] if b.get("type") != "null"]}

    def shape(roles: list[str], required: list[str], **extra: Any) -> dict[str, Any]:
        fields = {"role": {"enum": roles}, "content": text, "name": props["name"], **extra}
        return {"type": "object", "properties": fields, "required": ["role", *required], "additionalProperties": False}

    calls = {**props["tool_calls"]["anyOf"][0], "minItems": 1}
    schema["anyOf"] = [
        shape(["system", "developer", "user"], ["content"]),
        shape(["assistant"], ["content"], tool_calls=props["tool_calls"]),
        shape(["assistant"], ["tool_calls"], content=props["content"], tool_calls=calls),
        shape(["tool"], ["content", "tool_call_id"], tool_call_id={"type": "string"}),
    ]
    for key in ("properties", "required", "additionalProperties"):
        schema.pop(key, None)


class OpenAIChatMessage(RequestModel):
    model_config = ConfigDict(json_schema_extra=_message_schema)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OpenAITextPart] | None = Field(None, description="Null only on an assistant tool call.")
    name: str | None = None
    tool_calls: list[OpenAIToolCallIn] | None = Field(None, description="Assistant messages only.")
    tool_call_id: str | None = Field(None, description="Tool messages only: the call this is the result of.")

    @field_validator("content")
    @classmethod
    def _content_is_text(cls, value: str | list[OpenAITextPart] | None) -> str | list[OpenAITextPart] | None:
        return _valid_unicode(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tool_fields(self) -> OpenAIChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool_calls")
        if (self.tool_call_id is None) != (self.role != "tool"):
            raise ValueError("tool_call_id: required on tool messages, and only there")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (null only on an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestModel):
    include_usage: bool = False


class OpenAIChatCompletionRequest(RequestModel):
    """`POST /v1/chat/completions`. Fields OpenAI defines that this server cannot honour are a 400."""

    model: str | None = Field(
        None, description="A name `GET /v1/models` lists (the served id or `sahabat-ai`); another is a 404."
    )
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1000, description="Extension (as in vLLM).")
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0, description="Extension (as in vLLM).")
    stop: str | list[str] | None = Field(
        None, description="A stop sequence or up to 4; the match is not returned.", json_schema_extra=_stop_schema
    )
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at the value that means "off": anything else is refused (400, naming the field) rather
    # than ignored. The schema documents the accepted value; `unsupported()` gives the message.
    n: int = Field(1, json_schema_extra={"minimum": 1, "maximum": 1})
    logprobs: bool = Field(False, description="Return each output token's logprob (see docs/api.md).")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: the most likely alternatives per token."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    min_p: float | None = Field(None, ge=0, le=1, description="Extension (as in vLLM).")
    tools: list[OpenAITool] | None = Field(None, description="Functions the model may call (webapp.tool_calls).")
    tool_choice: Literal["none", "auto", "required"] | OpenAINamedToolChoice | None = Field(
        None, description="`auto` (the default with tools), `none`, `required` or a named function."
    )
    functions: list[dict] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: str | dict | None = Field(None, description="Only `none`.")
    response_format: dict | None = Field(
        None,
        description='`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": '
        '{"name": ..., "schema": {...}, "strict": true}}`: constrained decoding (see docs/api.md).',
    )
    logit_bias: dict | None = Field(None, json_schema_extra={"maxProperties": 0})
    parallel_tool_calls: bool | None = None
    # Harmless metadata, accepted and ignored.
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None

    _stops = field_validator("stop")(_check_stops)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _one_tool_choice(cls, value: Any) -> Any:
        """One message naming `tool_choice` (not a union branch), whichever form is wrong."""
        if value is None or value in ("none", "auto", "required"):
            return value
        if isinstance(value, dict):
            try:
                return OpenAINamedToolChoice.model_validate(value)
            except ValueError:
                pass
        raise ValueError("""must be "none", "auto", "required" or {"type": "function", "function": {"name": "..."}}""")

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) of the first field set to something this server does not do."""
        checks: list[tuple[str, bool, str]] = [
            ("n", self.n != 1, "only n=1 is supported"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs, "logprobs must be true to use it"),
            ("functions", bool(self.functions), "the legacy functions field is not supported: use tools"),
            (
                "function_call",
                self.function_call not in (None, "none"),
                "function_call is not supported: use tool_choice",
            ),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
        ]
        for name, refused, reason in checks:
            if refused:
                return name, reason
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class OpenAIFunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class OpenAIToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: OpenAIFunctionCallOut


class OpenAIResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[OpenAIToolCall] | None = None


class OpenAITopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class OpenAITokenLogprob(OpenAITopLogprob):
    top_logprobs: list[OpenAITopLogprob]


class OpenAIChoiceLogprobs(BaseModel):
    content: list[OpenAITokenLogprob] | None
    refusal: list[OpenAITokenLogprob] | None = None


class OpenAIChoice(BaseModel):
    index: int = 0
    message: OpenAIResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: OpenAIChoiceLogprobs | None = None


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAIChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage


class OpenAIFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class OpenAIToolCallDelta(BaseModel):
    """A streamed tool call: the first piece has id, type and name; later ones add `arguments` text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: OpenAIFunctionDelta


class OpenAIDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[OpenAIToolCallDelta] | None = None


class OpenAIChunkChoice(BaseModel):
    index: int = 0
    delta: OpenAIDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: OpenAIChoiceLogprobs | None = None


class OpenAIChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[OpenAIChunkChoice]
    usage: OpenAIUsage | None = None


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sahabat-ai-service"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class ReadyResponse(BaseModel):
    """`GET /ready`: 200 once the model is loaded and the engine admits work, else 503 with the reason."""

    status: EngineState
    reason: str
    model: str | None = None
