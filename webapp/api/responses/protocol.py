"""The Responses API's bodies (`POST /v1/responses`), its response object and its stream's events.

The request body is strict (`extra="forbid"`: an unknown field is a 400). `input` items and `tools` are kept as
objects here and checked item by item in webapp.api.responses.builder, so a 400 names the exact field
(`input.3.call_id`, `tools.0.type`) rather than a branch of a union."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from webapp.api.fields import (
    FORCED_CALL,
    NULL,
    STREAM_OPTIONS_NEED_STREAM,
    TEXT_FORMAT_ONLY,
    RequestModel,
    Text,
    field_absent_or,
    field_is,
    format_kind,
    inline_schema,
    schema_is,
    when,
)
from webapp.api.openai.protocol import ERRORS, JSON_SCHEMA_SPEC, NOT_FOUND

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
STATELESS = "this server does not store responses: send the whole conversation in `input`"


# --- the request ---------------------------------------------------------------------------------------------


class InputTextPart(RequestModel):
    """A text part of a message's `content`; `output_text` (an earlier reply sent back) may carry its extras."""

    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[dict[str, Any]]
    # What an output message sent back as input carries: accepted, not used.
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(RequestModel):
    """A call an earlier reply made (history): an assistant turn with that tool call."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(pattern=NAME_PATTERN)
    arguments: Text
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(RequestModel):
    """The result of a call: a `tool` turn answering `call_id`."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Text | list[InputTextPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class FunctionTool(RequestModel):
    """A tool (flat, unlike chat's nested `function`): `parameters` is the JSON Schema of its arguments."""

    type: Literal["function"]
    name: str = Field(pattern=NAME_PATTERN)
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    name: str


# The shapes `text.format` takes (checked by hand in webapp.api.responses.builder, then as chat's response_format).
TEXT_FORMAT_SCHEMA: dict[str, Any] = {
    "oneOf": [
        format_kind("text"),
        format_kind("json_object"),
        format_kind("json_schema", ("name", "schema"), **JSON_SCHEMA_SPEC["properties"]),
        NULL,
    ]
}


class TextConfig(RequestModel):
    format: dict[str, Any] | None = Field(
        None,
        description='`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "name": ..., '
        '"schema": {...}, "strict": true}`: constrained decoding (see docs/api.md).',
        json_schema_extra=schema_is(TEXT_FORMAT_SCHEMA),
    )
    verbosity: Literal["low", "medium", "high"] | None = None


def _input_schema() -> dict[str, Any]:
    """`input`'s items as the builder checks them, one by one (kept as dicts in the model so that a 400 names
    the exact field): a message (text parts only), a function call, a function call's output."""
    message = inline_schema(MessageItem)
    message["properties"]["content"] = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": inline_schema(InputTextPart)}]
    }
    items = [message, inline_schema(FunctionCallItem), inline_schema(FunctionCallOutputItem)]
    return {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"anyOf": items}}]}


def _tools_schema() -> dict[str, Any]:
    tool = inline_schema(FunctionTool)
    tool["properties"]["parameters"] = {
        "anyOf": [{"type": "object", "properties": {"type": {"const": "object"}}, "required": ["type"]}, NULL],
        "description": 'The JSON Schema of the arguments, of "type": "object" (none: no arguments).',
    }
    return {"anyOf": [{"type": "array", "items": tool}, NULL]}


TOOL_CHOICE_SCHEMA = {
    "anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, inline_schema(NamedToolChoice), NULL]
}


def _off_only(*accepted: dict[str, Any]) -> Any:
    """A field refused (see unsupported()) unless at the value that means "off": `accepted` or null."""
    return schema_is({"anyOf": [*accepted, NULL]} if accepted else NULL)


class ResponsesStreamOptions(RequestModel):
    include_obfuscation: bool | None = None


class ResponsesRequest(RequestModel):
    """`POST /v1/responses`. Stateless: fields that need stored state or tools this server lacks are 400s."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when(
                    "tool_choice",
                    {"not": {"anyOf": [NULL, {"const": "none"}]}},
                    field_is("tools", {"type": "array", "minItems": 1}),
                ),
                when(
                    "tool_choice",
                    FORCED_CALL,
                    field_absent_or("text", {"anyOf": [NULL, field_absent_or("format", TEXT_FORMAT_ONLY)]}),
                ),
                STREAM_OPTIONS_NEED_STREAM,
            ]
        }
    )

    model: str | None = Field(
        None, description="A name `GET /v1/models` lists (the served id or `sahabat-ai`); another is a 404."
    )
    input: Text | list[dict[str, Any]] = Field(
        description="A user message as a string, or the whole conversation as items: `message` (roles user, "
        "assistant, system, developer; text content), `function_call` and `function_call_output`.",
        json_schema_extra=schema_is(_input_schema()),
    )
    instructions: Text | None = Field(None, description="A system message put first.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, description="Function tools only (`type: function`).", json_schema_extra=schema_is(_tools_schema())
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None,
        description='`auto` (the default with tools), `none`, `required` or `{"type": "function", "name": ...}`.',
        json_schema_extra=schema_is(TOOL_CHOICE_SCHEMA),
    )
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    store: bool | None = Field(None, description="Accepted; nothing is ever stored.")
    # Refused unless at the value that means "off" (see unsupported()).
    previous_response_id: str | None = Field(None, json_schema_extra=_off_only())
    conversation: str | dict[str, Any] | None = Field(None, json_schema_extra=_off_only())
    background: bool | None = Field(None, json_schema_extra=_off_only({"type": "boolean", "enum": [False]}))
    reasoning: dict[str, Any] | None = Field(None, json_schema_extra=_off_only())
    include: list[str] | None = Field(
        None, json_schema_extra=_off_only({"type": "array", "items": {"type": "string"}, "maxItems": 0})
    )
    prompt: dict[str, Any] | None = Field(None, json_schema_extra=_off_only())
    max_tool_calls: int | None = Field(None, json_schema_extra=_off_only())
    top_logprobs: int | None = Field(None, json_schema_extra=_off_only({"type": "integer", "minimum": 0, "maximum": 0}))
    truncation: Literal["auto", "disabled"] | None = Field(
        None, json_schema_extra=_off_only({"type": "string", "enum": ["disabled"]})
    )
    # Harmless metadata, accepted and ignored.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) of the first field set to something this server does not do."""
        checks: list[tuple[str, bool, str]] = [
            ("previous_response_id", self.previous_response_id is not None, STATELESS),
            ("conversation", self.conversation is not None, STATELESS),
            ("prompt", self.prompt is not None, "stored prompt templates are not supported: send `input`"),
            ("background", bool(self.background), "background responses are not supported (nothing is stored)"),
            ("reasoning", self.reasoning is not None, "reasoning is not supported: the served model does not reason"),
            ("include", bool(self.include), "include is not supported: there are no extra outputs to include"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported on /v1/responses"),
            ("max_tool_calls", self.max_tool_calls is not None, "max_tool_calls is not supported"),
            ("truncation", self.truncation == "auto", 'only "disabled": the conversation is never truncated'),
            ("stream_options", self.stream_options is not None and not self.stream, "only allowed with stream=true"),
        ]
        for name, refused, reason in checks:
            if refused:
                return name, reason
        return None


# --- the response --------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The response, echoing the request's settings as OpenAI does (the fields the SDK's `Response` requires)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | OutputFunctionCall] = []
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: None = None
    store: bool = False
    background: bool = False
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


RESPONSE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'The response; with `"stream": true` a `text/event-stream` of Responses events (`event: '
        "response.created` ... `event: response.completed`), each `data:` a JSON object with `type` and "
        "`sequence_number` (docs/api.md).",
        "content": {"text/event-stream": {}},
    },
    **ERRORS,
    404: NOT_FOUND,
}
