"""The Anthropic Messages API's bodies and responses (POST /v1/messages, /v1/messages/count_tokens, errors).

Request models are strict (`webapp.api.fields.RequestModel`): a field Anthropic defines that this server does not
know is a 400 naming it. Blocks and tools this server cannot serve (images, documents, thinking, server tools) are
parsed so that the builder can refuse them with a message that says why.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from webapp.api.fields import RequestModel, Text, _valid_unicode

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


class ToolResultBlock(RequestModel):
    """A user turn's answer to a tool_use block; `content` text (image blocks are refused)."""

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


class AnthropicMessage(RequestModel):
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


class AnthropicToolChoice(RequestModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description='The tool to call, with `"type": "tool"` only.')
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_with_tool(self) -> AnthropicToolChoice:
        if (self.name is None) == (self.type == "tool"):
            raise ValueError('name: required with "type": "tool", and only there')
        return self


class CountTokensRequest(RequestModel):
    """`POST /v1/messages/count_tokens`: the conversation, system prompt and tools, as /v1/messages takes them."""

    model: str = Field(description="The served model id or `sahabat-ai`; another is a 404 not_found_error.")
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = Field(None, description='Only `{"type": "disabled"}`: no extended thinking.')

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
