"""A Messages body -> the chat completions body it means -> `openai_request`: one copy of the tool, grammar, limit
and stop logic (webapp.api.openai), with its errors translated back to the Messages API's field names.

The mapping (docs/api.md, "The Anthropic Messages API"):
- `system` (a string or text blocks) -> a leading system message;
- a message's text blocks -> its text; an assistant turn's `tool_use` blocks -> `tool_calls` (arguments: the input
  as JSON); a user turn's `tool_result` blocks -> `tool` messages, placed before the turn's own text;
- `max_tokens` -> `max_completion_tokens`, `stop_sequences` -> `stop`, `temperature`, `top_p`, `top_k` as they are;
- `tools` -> function tools (`input_schema` -> `parameters`); `tool_choice` auto / any (-> required) / tool (-> the
  named function: exactly one call) / none; `disable_parallel_tool_use` -> `parallel_tool_calls: false`.
Refused (400 naming the field): image, document and other non-text blocks, `thinking` other than disabled; server
tools are refused by the body model (webapp.api.anthropic.protocol).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from inference import GenerationRequest
from webapp.api.anthropic.protocol import (
    AnthropicMessage,
    AnthropicToolChoice,
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UnsupportedBlock,
)
from webapp.api.openai.builder import openai_request
from webapp.api.openai.protocol import OpenAIChatCompletionRequest
from webapp.api.openai.tools import ToolUse
from webapp.errors import BadRequest, describe_validation_errors
from webapp.settings import Settings

# The chat builder's field names -> the Messages API's.
_FIELDS = {
    "max_completion_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "stop": "stop_sequences",
    "tool_choice.function.name": "tool_choice.name",
    "response_format": "output_config.format",
}
_MESSAGE_PARAM = re.compile(r"messages\.(\d+)(.*)")
_TOOL_PARAM = re.compile(r"tools\.(\d+)\.function(?:\.(parameters|name))?(.*)")


def _refuse(param: str, reason: str) -> BadRequest:
    return BadRequest(f"{param}: {reason}", param=param)


def _unsupported_block(block: UnsupportedBlock, where: str) -> BadRequest:
    if block.type in ("thinking", "redacted_thinking"):
        return _refuse(f"{where}.type", f"{block.type} blocks are not supported: this server has no extended thinking")
    return _refuse(f"{where}.type", f"{block.type} blocks are not supported: this server's model reads text only")


def _texts(blocks: str | list[Any] | None, where: str) -> str:
    """The text of a string or of text blocks (tool results, the system prompt); other blocks are refused."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    parts = []
    for index, block in enumerate(blocks):
        if isinstance(block, UnsupportedBlock):
            raise _unsupported_block(block, f"{where}.{index}")
        parts.append(block.text)
    return "\n\n".join(parts)


def _tool_result(block: ToolResultBlock, where: str, open_calls: set[str]) -> dict[str, Any]:
    if block.tool_use_id not in open_calls:
        raise _refuse(
            f"{where}.tool_use_id",
            f"{block.tool_use_id!r} answers no tool_use block of the assistant turn just before this one",
        )
    text = _texts(block.content, f"{where}.content")
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": f"Error: {text}" if block.is_error else text}


def _turn(message: AnthropicMessage, path: str, open_calls: set[str]) -> list[tuple[dict[str, Any], str]]:
    """One Messages turn as chat messages, each with the Messages path it came from (for error messages)."""
    if isinstance(message.content, str):
        return [({"role": message.role, "content": message.content}, path)]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[tuple[dict[str, Any], str]] = []
    for index, block in enumerate(message.content):
        where = f"{path}.content.{index}"
        if isinstance(block, UnsupportedBlock):
            raise _unsupported_block(block, where)
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise _refuse(f"{where}.type", "tool_use blocks belong to assistant turns")
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
        else:
            if message.role != "user":
                raise _refuse(f"{where}.type", "tool_result blocks belong to user turns")
            results.append((_tool_result(block, where, open_calls), where))
    text = "\n\n".join(texts)
    if message.role == "assistant":
        return [({"role": "assistant", "content": text or (None if calls else ""), "tool_calls": calls or None}, path)]
    return results + ([({"role": "user", "content": text}, path)] if texts or not results else [])


def chat_messages(body: CountTokensRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages of a Messages body, and for each the Messages path it came from."""
    converted: list[tuple[dict[str, Any], str]] = []
    if body.system:
        converted.append(({"role": "system", "content": _texts(body.system, "system")}, "system"))
    open_calls: set[str] = set()  # the tool_use ids of the assistant turn just before
    for index, message in enumerate(body.messages):
        converted += _turn(message, f"messages.{index}", open_calls)
        last = converted[-1][0]
        open_calls = {call["id"] for call in last.get("tool_calls") or []} if message.role == "assistant" else set()
    return [message for message, _ in converted], [path for _, path in converted]


def _tool_choice(choice: AnthropicToolChoice | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def _response_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """`output_config.format` (Anthropic's structured outputs) as the chat body's `response_format`."""
    unknown = sorted(set(config or {}) - {"effort", "format"})
    if unknown:
        raise _refuse(f"output_config.{unknown[0]}", "not supported (only format and effort)")
    spec = (config or {}).get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(spec.get("schema"), dict):
        raise _refuse("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": spec["schema"], "strict": True}}


def chat_body(body: CountTokensRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completions body a Messages body means; a count_tokens body generates nothing (max 1 token)."""
    chat: dict[str, Any] = {"messages": messages, "max_completion_tokens": 1}
    if isinstance(body, MessagesRequest):
        chat.update(max_completion_tokens=body.max_tokens, temperature=body.temperature, stop=body.stop_sequences)
        chat.update(top_p=body.top_p, top_k=body.top_k, response_format=_response_format(body.output_config))
    if body.tools:
        functions = [{"name": t.name, "description": t.description, "parameters": t.input_schema} for t in body.tools]
        chat["tools"] = [{"type": "function", "function": function} for function in functions]
    chat["tool_choice"] = _tool_choice(body.tool_choice)
    if body.tool_choice is not None and body.tool_choice.disable_parallel_tool_use:
        chat["parallel_tool_calls"] = False
    return {name: value for name, value in chat.items() if value is not None}


def anthropic_param(param: str, origins: list[str]) -> str:
    """A chat builder's field name as the Messages API names it (`max_completion_tokens` -> `max_tokens`,
    `messages.3.tool_call_id` -> `messages.2.content.0.tool_use_id`, `tools.0.function.parameters` ->
    `tools.0.input_schema`)."""
    if param in _FIELDS:
        return _FIELDS[param]
    message = _MESSAGE_PARAM.fullmatch(param)
    if message and int(message[1]) < len(origins):
        return origins[int(message[1])] + message[2].replace("tool_call_id", "tool_use_id")
    tool = _TOOL_PARAM.fullmatch(param)
    if tool:
        field = {"parameters": ".input_schema", "name": ".name"}.get(tool[2] or "", "")
        return f"tools.{tool[1]}{field}{tool[3]}"
    return param


def _translated(error: BadRequest, origins: list[str]) -> BadRequest:
    if error.param is None:
        return error
    param = anthropic_param(error.param, origins)
    detail = error.detail
    if detail.startswith(error.param):
        detail = param + detail[len(error.param) :]
    return BadRequest(detail, param=param)


def anthropic_request(
    body: CountTokensRequest, settings: Settings, *, request_id: str
) -> tuple[GenerationRequest, ToolUse]:
    """The engine's request and the tool use the route reads the reply with, built by the chat builder."""
    if body.refused_thinking():
        raise _refuse("thinking", "extended thinking is not supported by this server (send no thinking field)")
    messages, origins = chat_messages(body)
    try:
        chat = OpenAIChatCompletionRequest.model_validate(chat_body(body, messages))
    except ValidationError as error:  # the Messages model checks first; a safety net, in the chat builder's names
        errors = list(error.errors())
        first = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        raise _translated(BadRequest(describe_validation_errors(errors), param=first or None), origins) from None
    try:
        return openai_request(chat, settings, request_id=request_id)
    except BadRequest as error:
        raise _translated(error, origins) from None
