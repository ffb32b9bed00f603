"""A Responses body -> the chat body it means -> `openai_request` (webapp.api.openai.builder): one copy of the tool,
grammar, limit and stop logic for both APIs.

What is Responses-only is checked here first (refused fields, `input` items, `tools`, `tool_choice`,
`text.format`), with 400s naming the Responses field. A 400 the chat model or builder raises names a chat field
(`messages.3.tool_call_id`, `max_completion_tokens`, `response_format`): it is renamed to the Responses field it
came from (`input.3.call_id`, `max_output_tokens`, `text.format`) by `_renamed`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from inference import GenerationRequest
from webapp.api.openai.builder import openai_request
from webapp.api.openai.protocol import OpenAIChatCompletionRequest
from webapp.api.openai.tools import ToolUse
from webapp.api.responses.protocol import (
    STATELESS,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputTextPart,
    MessageItem,
    NamedToolChoice,
    ResponsesRequest,
)
from webapp.errors import BadRequest, describe_validation_errors
from webapp.settings import Settings

Model = TypeVar("Model", bound=BaseModel)
ITEM_TYPES: dict[str, type[BaseModel]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}
NOT_TEXT_PARTS = ("input_image", "input_file", "input_audio")
FORMAT_KEYS = {
    "text": {"type"},
    "json_object": {"type"},
    "json_schema": {"type", "name", "schema", "strict", "description"},
}


def _checked(model: type[Model], value: Any, where: str) -> Model:
    """`value` validated as `model`; a ValidationError becomes a 400 naming the field under `where`."""
    try:
        return model.model_validate(value)
    except ValidationError as error:
        prefix = tuple(where.split(".")) if where else ()
        errors = [{**e, "loc": (*prefix, *e["loc"])} for e in error.errors()]
        first = ".".join(str(p) for p in errors[0]["loc"])
        raise BadRequest(describe_validation_errors(errors), param=first) from None


def _content(item: MessageItem, where: str) -> str:
    if isinstance(item.content, str):
        return item.content
    texts: list[str] = []
    for index, part in enumerate(item.content):
        kind = part.get("type") if isinstance(part, dict) else None
        field = f"{where}.content.{index}"
        if kind in NOT_TEXT_PARTS:
            raise BadRequest(
                f"{field}.type: {kind} is not supported: the served model reads text only (input_text)",
                param=f"{field}.type",
            )
        texts.append(_checked(InputTextPart, part, field).text)
    return "".join(texts)


def _messages(body: ResponsesRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The chat messages `input` (and `instructions`) mean, and for each the Responses field it came from."""
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        origins.append("instructions")
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}], [*origins, "input"]
    if not body.input:
        raise BadRequest("input: must hold at least one item", param="input")
    for index, raw in enumerate(body.input):
        where = f"input.{index}"
        kind = raw.get("type", "message")
        if not isinstance(kind, str) or kind not in ITEM_TYPES:
            reason = STATELESS if kind == "item_reference" else "only message, function_call and function_call_output"
            raise BadRequest(f"{where}.type: item type {kind!r} is not supported: {reason}", param=f"{where}.type")
        item = _checked(ITEM_TYPES[kind], raw, where)
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _content(item, where)})
            origins.append(where)
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls after a reply's text: one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(where)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
            origins.append(where)
    return messages, origins


def _tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if body.tools is None:
        return None
    tools = []
    for index, raw in enumerate(body.tools):
        kind = raw.get("type")
        if kind != "function":
            raise BadRequest(
                f"tools.{index}.type: tool type {kind!r} is not supported: built-in tools are not available here, "
                "only function tools",
                param=f"tools.{index}.type",
            )
        tool = _checked(FunctionTool, raw, f"tools.{index}")
        function = tool.model_dump(exclude={"type"}, exclude_none=True)
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(body: ResponsesRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function":
        raise BadRequest(
            f"tool_choice: {choice.get('type')!r} is not supported: "
            '"none", "auto", "required" or {"type": "function", "name": "..."}',
            param="tool_choice",
        )
    named = _checked(NamedToolChoice, choice, "tool_choice")
    return {"type": "function", "function": {"name": named.name}}


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` (name and schema at its top) as chat's `response_format` (them under `json_schema`)."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None:
        return None
    kind = fmt.get("type")
    if not isinstance(kind, str) or kind not in FORMAT_KEYS:
        raise BadRequest(
            f'text.format.type: must be "text", "json_object" or "json_schema" (got {kind!r})', param="text.format.type"
        )
    unknown = sorted(set(fmt) - FORMAT_KEYS[kind])
    if unknown:
        raise BadRequest(f"text.format: unexpected field(s) for type {kind!r}: {', '.join(unknown)}", "text.format")
    if kind != "json_schema":
        return {"type": kind}
    if "name" not in fmt:
        raise BadRequest('text.format.name: required with type "json_schema"', param="text.format.name")
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def chat_body(body: ResponsesRequest) -> tuple[dict[str, Any], list[str]]:
    """The chat completion body this Responses body means, and the origin of each of its messages."""
    refused = body.unsupported()
    if refused is not None:
        field, reason = refused
        raise BadRequest(f"{field}: {reason}", param=field)
    messages, origins = _messages(body)
    chat: dict[str, Any] = {
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "response_format": _response_format(body),
        "tools": _tools(body),
        "tool_choice": _tool_choice(body),
        "parallel_tool_calls": body.parallel_tool_calls,
        "stream": bool(body.stream),
    }
    return {key: value for key, value in chat.items() if value is not None}, origins


def _renames(origins: list[str]) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    def message(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return origins[index] if index < len(origins) else "input"

    return [
        (re.compile(r"^messages\.(\d+)\.tool_call_id"), lambda m: f"{message(m)}.call_id"),
        (re.compile(r"^messages\.(\d+)"), message),
        (re.compile(r"^messages"), lambda m: "input"),
        (re.compile(r"^max_completion_tokens"), lambda m: "max_output_tokens"),
        (re.compile(r"^response_format(\.json_schema)?"), lambda m: "text.format"),
        (re.compile(r"^tools\.(\d+)\.function"), lambda m: f"tools.{m.group(1)}"),
        (re.compile(r"^tool_choice\.function"), lambda m: "tool_choice"),
    ]


def _renamed(error: BadRequest, origins: list[str]) -> BadRequest:
    """A chat builder's 400 with the Responses field names."""
    param, detail = error.param, error.detail
    if param is None:
        return error
    for pattern, replace in _renames(origins):
        match = pattern.match(param)
        if match:
            new = replace(match) + param[match.end() :]
            if detail.startswith(param):
                detail = new + detail[len(param) :]
            param = new
            break
    if param == "text.format":
        detail = detail.replace("json_schema.", "")
    if param.endswith(".call_id"):  # "answers no tool call of the assistant message before it (...)"
        detail = detail.split(" answers ")[0] + " answers no function_call item before it (a function_call_output "
        detail += "follows the function_call items it answers)"
    return BadRequest(detail, param=param)


def responses_request(
    body: ResponsesRequest, settings: Settings, *, request_id: str
) -> tuple[GenerationRequest, ToolUse]:
    """The engine's request and the tool use (the route parses the reply with it), as for a chat completion."""
    chat, origins = chat_body(body)
    try:
        completion = _checked(OpenAIChatCompletionRequest, chat, "")
        return openai_request(completion, settings, request_id=request_id)
    except BadRequest as error:
        raise _renamed(error, origins) from None
