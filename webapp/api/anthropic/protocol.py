"""The Anthropic Messages API's bodies and responses (POST /v1/messages, /v1/messages/count_tokens, errors).

Request models are strict (`webapp.api.fields.RequestModel`): a field Anthropic defines that this server does not
know is a 400 naming it. Blocks and tools this server cannot serve (images, documents, thinking, server tools) are
parsed so that the builder can refuse them with a message that says why.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webapp.api.fields import NULL, RequestModel, Text, _valid_unicode, field_absent_or, field_is, schema_is, when

TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_STOP_SEQUENCES = 4


class CacheControl(RequestModel):
    """Prompt caching hints: accepted and ignored (the batched engine's prefix cache needs none)."""

    type: Literal["ephemeral"]
    ttl: str | None = None


class TextBlock(RequestModel):
    type: Literal["text"]
    text: Text
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None


class ToolUseBlock(RequestModel):
    """A call an earlier assistant turn made (history)."""

    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


def _without_unsupported(node: Any) -> Any:
    """`node` with every reference to UnsupportedBlock (and the discriminator naming it) left out: the model parses
    those blocks only to refuse them with a message (webapp.api.anthropic.builder), so the schema does not offer
    them."""
    if isinstance(node, list):
        return [_without_unsupported(item) for item in node if not _is_unsupported_ref(item)]
    if isinstance(node, dict):
        return {key: _without_unsupported(value) for key, value in node.items() if key != "discriminator"}
    return node


def _is_unsupported_ref(node: Any) -> bool:
    return isinstance(node, dict) and "UnsupportedBlock" in str(node.get("$ref", ""))  # a name pydantic decorates


def _text_blocks_only(schema: dict[str, Any]) -> None:
    schema.update(_without_unsupported(schema))


class ToolResultBlock(RequestModel):
    """A user turn's answer to a tool_use block; `content` text (image blocks are refused)."""

    model_config = ConfigDict(json_schema_extra=_text_blocks_only)

    type: Literal["tool_result"]
    tool_use_id: str
    content: Text | list[TextBlock | UnsupportedBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class UnsupportedBlock(BaseModel):
    """A block kind Anthropic defines that this text-only server refuses (the builder says so, naming the block)."""

    model_config = ConfigDict(extra="allow")

    type: Literal[
        "image",
        "document",
        "search_result",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "container_upload",
    ]


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | UnsupportedBlock, Field(discriminator="type")]
ToolResultBlock.model_rebuild()


def _message_schema(schema: dict[str, Any]) -> None:
    """One shape per role, as the builder checks them: tool_use blocks in assistant turns, tool_result blocks in user
    turns, no block kind that is refused (images, documents, thinking, ...)."""
    blocks = _without_unsupported(schema["properties"]["content"]["anyOf"][1]["items"])
    kinds = blocks.pop("oneOf", None) or blocks.pop("anyOf")

    def shape(role: str, refused: str) -> dict[str, Any]:
        items = {**blocks, "anyOf": [kind for kind in kinds if refused not in kind.get("$ref", "")]}
        content = {"anyOf": [{"type": "string"}, {"type": "array", "items": items}]}
        return {
            "type": "object",
            "properties": {"role": {"type": "string", "enum": [role]}, "content": content},
            "required": ["role", "content"],
            "additionalProperties": False,
        }

    schema["anyOf"] = [shape("user", "ToolUseBlock"), shape("assistant", "ToolResultBlock")]
    for key in ("properties", "required", "additionalProperties", "type"):
        schema.pop(key, None)


class AnthropicMessage(RequestModel):
    model_config = ConfigDict(json_schema_extra=_message_schema)

    role: Literal["user", "assistant"]
    content: Text | list[ContentBlock]


class AnthropicTool(RequestModel):
    """A client tool. Server tools (a `type` such as `web_search_20250305` or `bash_20250124`) are refused."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME)
    description: Text | None = None
    input_schema: dict[str, Any] = Field(
        description='The JSON Schema of the input, of "type": "object".',
        json_schema_extra={"properties": {"type": {"const": "object"}}, "required": ["type"]},
    )
    cache_control: CacheControl | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(
                f"server tools are not supported (type {str(data.get('type'))[:64]!r}): only client tools "
                '{"name", "description", "input_schema"}'
            )
        return data


def _tool_choice_schema(schema: dict[str, Any]) -> None:
    """`name` with `"type": "tool"`, and only there (the validator below)."""
    props = schema.pop("properties")
    common = {"disable_parallel_tool_use": props["disable_parallel_tool_use"]}
    string = {"type": "string"}
    schema["anyOf"] = [
        {
            "type": "object",
            "properties": {"type": {"type": "string", "enum": kinds}, "name": name, **common},
            "required": required,
            "additionalProperties": False,
        }
        for kinds, name, required in ((["auto", "any", "none"], NULL, ["type"]), (["tool"], string, ["type", "name"]))
    ]
    for key in ("required", "additionalProperties", "type"):
        schema.pop(key, None)


class AnthropicToolChoice(RequestModel):
    model_config = ConfigDict(json_schema_extra=_tool_choice_schema)

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description='The tool to call, with `"type": "tool"` only.')
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_with_tool(self) -> AnthropicToolChoice:
        if (self.name is None) == (self.type == "tool"):
            raise ValueError('name: required with "type": "tool", and only there')
        return self


def _object(required: tuple[str, ...] | None = None, extra: bool = False, **properties: Any) -> dict[str, Any]:
    """An object schema of `properties`, all required unless `required` says which."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": extra,
    }


# `format`: a JSON Schema the reply must validate against (other keys beside type and schema are ignored).
_OUTPUT_FORMAT = _object(extra=True, type={"type": "string", "enum": ["json_schema"]}, schema={"type": "object"})
OUTPUT_CONFIG_SCHEMA = {"anyOf": [_object((), effort={}, format={"anyOf": [_OUTPUT_FORMAT, NULL]}), NULL]}


class CountTokensRequest(RequestModel):
    """`POST /v1/messages/count_tokens`: the conversation, system prompt and tools, as /v1/messages takes them."""

    # A tool_choice other than none needs tools (the chat builder's rule), stated for clients and fuzzers.
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when(
                    "tool_choice",
                    {"type": "object", "properties": {"type": {"enum": ["auto", "any", "tool"]}}, "required": ["type"]},
                    field_is("tools", {"type": "array", "minItems": 1}),
                ),
                # A forced call (any, tool) is the reply: no output format beside it.
                when(
                    "tool_choice",
                    {"type": "object", "properties": {"type": {"enum": ["any", "tool"]}}, "required": ["type"]},
                    field_absent_or("output_config", {"anyOf": [NULL, field_absent_or("format", NULL)]}),
                ),
            ]
        }
    )

    model: str = Field(description="The served model id or `sahabat-ai`; another is a 404 not_found_error.")
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = Field(
        None,
        description='Only `{"type": "disabled"}`: no extended thinking.',
        json_schema_extra=schema_is({"anyOf": [_object(type={"type": "string", "enum": ["disabled"]}), NULL]}),
    )

    def refused_thinking(self) -> bool:
        return self.thinking is not None and self.thinking != {"type": "disabled"}


def _stop_sequences_schema(schema: dict[str, Any]) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            branch["maxItems"] = MAX_STOP_SEQUENCES
            branch.setdefault("items", {})["minLength"] = 1


class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages`. Fields Anthropic defines that this server cannot honour are a 400 naming them."""

    max_tokens: int = Field(ge=1, description="Most tokens to generate (up to MAX_NEW_TOKENS_CAP).")
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1000)
    stop_sequences: list[str] | None = Field(None, json_schema_extra=_stop_sequences_schema)
    output_config: dict[str, Any] | None = Field(
        None,
        description='`format` `{"type": "json_schema", "schema": {...}}`: the reply validates against the schema '
        "(constrained decoding); `effort` is accepted and ignored.",
        json_schema_extra=schema_is(OUTPUT_CONFIG_SCHEMA),
    )
    # Accepted and ignored: they change nothing a single local model does.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: CacheControl | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for stop in value or []:
            if not stop:
                raise ValueError("stop sequences must not be empty strings")
            _valid_unicode(stop)
        return value


# --- responses -------------------------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": AnthropicErrorResponse, "description": text}
    for code, text in [
        (400, "invalid_request_error: a field this server refuses or a value out of range"),
        (401, "authentication_error: missing or invalid API key (x-api-key or Authorization: Bearer)"),
        (404, "not_found_error: unknown model"),
        (413, "request_too_large: body larger than MAX_BODY_BYTES"),
        (500, "api_error"),
        (502, "api_error: the remote engine's upstream failed"),
        (503, "overloaded_error: model loading or service busy; retry after Retry-After seconds"),
    ]
}
MESSAGE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'The message; with `"stream": true` a `text/event-stream` of Anthropic\'s events '
        "(message_start ... message_stop).",
        "content": {"text/event-stream": {}},
    },
    **ERRORS,
}
