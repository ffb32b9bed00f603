"""The OpenAI-compatible chat API's bodies and responses (/v1/chat/completions, /v1/models, errors)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webapp.api.fields import (
    FORCED_CALL,
    NULL,
    STREAM_OPTIONS_NEED_STREAM,
    TEXT_FORMAT_ONLY,
    RequestModel,
    Text,
    _check_stops,
    _stop_schema,
    _valid_unicode,
    field_absent_or,
    field_is,
    format_kind,
    schema_is,
    when,
)

# The shapes `response_format` takes (webapp.api.openai.builder.parse_response_format checks them by hand, so that
# every refusal names `response_format`). `schema` is any JSON Schema object; whether the engine can enforce it is
# checked at submit (a 400 too, which no JSON Schema can foretell).
FORMAT_NAME = r"^[A-Za-z0-9_-]{1,64}$"
JSON_SCHEMA_SPEC: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": FORMAT_NAME},
        "schema": {"type": "object", "description": "A JSON Schema."},
        "strict": {"anyOf": [{"type": "boolean"}, NULL]},
        "description": {"anyOf": [{"type": "string"}, NULL]},
    },
    "required": ["schema"],
    "additionalProperties": False,
}


RESPONSE_FORMAT_SCHEMA: dict[str, Any] = {
    "oneOf": [
        format_kind("text"),
        format_kind("json_object"),
        format_kind("json_schema", json_schema=JSON_SCHEMA_SPEC),
        NULL,
    ]
}


class OpenAITextPart(RequestModel):
    type: Literal["text"]
    text: Text


class OpenAIFunction(RequestModel):
    """A tool's function: `parameters` is the JSON Schema of its arguments (checked in webapp.api.openai.tools)."""

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

    # The rules between fields that JSON Schema can state (the builder checks them, webapp.api.openai.builder).
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when("top_logprobs", {"type": "integer"}, field_is("logprobs", {"const": True})),
                when(
                    "tool_choice",
                    {"not": {"anyOf": [NULL, {"const": "none"}]}},
                    field_is("tools", {"type": "array", "minItems": 1}),
                ),
                when("tool_choice", FORCED_CALL, field_absent_or("response_format", TEXT_FORMAT_ONLY)),
                STREAM_OPTIONS_NEED_STREAM,
            ]
        }
    )

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
    tools: list[OpenAITool] | None = Field(None, description="Functions the model may call (webapp.api.openai.tools).")
    tool_choice: Literal["none", "auto", "required"] | OpenAINamedToolChoice | None = Field(
        None, description="`auto` (the default with tools), `none`, `required` or a named function."
    )
    functions: list[dict] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: str | dict | None = Field(
        None,
        description="The legacy field: only `none` (or null); use `tool_choice`.",
        json_schema_extra=schema_is({"anyOf": [{"type": "string", "enum": ["none"]}, NULL]}),
    )
    response_format: dict | None = Field(
        None,
        description='`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": '
        '{"name": ..., "schema": {...}, "strict": true}}`: constrained decoding (see docs/api.md).',
        json_schema_extra=schema_is(RESPONSE_FORMAT_SCHEMA),
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


# The documented error answers of every /v1 route (for the OpenAPI schema).
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": OpenAIErrorResponse, "description": text}
    for code, text in [
        (400, "Invalid request"),
        (401, "Missing or invalid API key"),
        (413, "Request body larger than MAX_BODY_BYTES"),
        (500, "Server error"),
        (502, "Upstream error"),
        (503, "Model loading or service busy; retry after Retry-After seconds"),
    ]
}
NOT_FOUND: dict[str, object] = {"model": OpenAIErrorResponse, "description": "Unknown model (`model_not_found`)"}
COMPLETION_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'The completion; with `"stream": true` a `text/event-stream` of `chat.completion.chunk` '
        "objects ending with `data: [DONE]`.",
        "content": {"text/event-stream": {}},
    },
    **ERRORS,
    404: NOT_FOUND,
}
