"""Tool calls on `/v1/chat/completions`: the prompt format, the history's rendering, the constraint and the parsing.

Neither chat template served here renders tools (SmolLM2's ChatML template and Gemma2's ignore a `tools=`
argument), so tools use one generic, documented format (docs/api.md#tool-calls), the same on every engine:

- The tools are described in a system message (folded into the first user turn on templates without a system
  role): one JSON line per tool (name, description, parameters), then the reply format for a call, exactly
  `{"tool_calls": [{"name": "<tool>", "arguments": {...}}]}` and nothing else.
- History: an assistant message with `tool_calls` becomes an assistant turn holding that same JSON (after its
  text, if any); `tool` messages become a user turn ("Result of tool call <id> (<name>): ..."), merged with
  neighbouring user turns, so the roles still alternate for Gemma2's strict template.
- `tool_choice`: `none` describes no tools and never parses the reply as a call; `auto` (the default with tools)
  generates freely and the reply is a call only when it is exactly the call format (surrounding whitespace or
  one Markdown code fence allowed), else text; `required` and a named function constrain the reply to the call
  format with each call's arguments matching that tool's `parameters` (`response_format` json_schema, decoded
  under a grammar by the engine). `parallel_tool_calls: false` allows one call per reply.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator, SchemaError

from inference import GenerationResult, Message, TextDelta
from inference.types import ResponseFormat, StreamEvent
from webapp.api.openai.protocol import (
    OpenAIChatCompletionRequest,
    OpenAIChatMessage,
    OpenAIDelta,
    OpenAIFunctionDelta,
    OpenAITool,
    OpenAIToolCall,
    OpenAIToolCallDelta,
)
from webapp.errors import BadRequest

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MAX_PARALLEL_CALLS = 8  # the most calls one constrained reply may hold with parallel_tool_calls
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_REF_PREFIX = "#/$defs/"


@dataclass(frozen=True)
class ToolCalls:
    """The reply parsed as calls: the stream event the routes turn into `tool_calls`."""

    calls: tuple[OpenAIToolCall, ...]


def _parameters(tool: OpenAITool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else EMPTY_PARAMETERS


def _check_tools(tools: Sequence[OpenAITool]) -> None:
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        name, field = tool.function.name, f"tools.{index}.function"
        if name in seen:
            raise BadRequest(f"{field}.name: duplicate tool name {name!r}", param=f"{field}.name")
        seen.add(name)
        parameters = _parameters(tool)
        try:
            Draft202012Validator.check_schema(parameters)
        except SchemaError as error:
            raise BadRequest(
                f"{field}.parameters: not a valid JSON Schema: {error.message}", param=f"{field}.parameters"
            ) from None
        if parameters.get("type") != "object":
            raise BadRequest(
                f'{field}.parameters: must be a JSON Schema of "type": "object"', param=f"{field}.parameters"
            )


def _hoisted(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """`schema` with its `$defs` moved into `defs` under `prefix` and its `#/$defs/...` refs renamed to match, so
    each tool's schema keeps working once nested inside the call object."""
    if isinstance(schema, list):
        return [_hoisted(item, prefix, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$defs" and isinstance(value, dict):
            for name, definition in value.items():
                defs[prefix + name] = _hoisted(definition, prefix, defs)
        elif key == "$ref" and isinstance(value, str) and value.startswith(_REF_PREFIX):
            out[key] = _REF_PREFIX + prefix + value[len(_REF_PREFIX) :]
        else:
            out[key] = _hoisted(value, prefix, defs)
    return out


def call_schema(tools: Sequence[OpenAITool], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of a whole reply that calls `tools`: `{"tool_calls": [...]}`, each call one of the tools with
    `name` fixed and `arguments` matching that tool's parameters."""
    defs: dict[str, Any] = {}
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": _hoisted(_parameters(tool), f"{tool.function.name}__", defs),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    calls = {
        "type": "array",
        "items": options[0] if len(options) == 1 else {"anyOf": options},
        "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
    }
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if defs:
        schema["$defs"] = defs
    return schema


def _call_json(name: str, arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def tools_prompt(tools: Sequence[OpenAITool], forced: str | None, required: bool, parallel: bool) -> str:
    """The system text that describes the tools and the reply format of a call."""
    lines = [
        "You can call the following tools (functions). Each line is one tool as JSON: its name, what it does "
        "and the JSON Schema of its arguments.",
    ]
    for tool in tools:
        described: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description:
            described["description"] = tool.function.description
        described["parameters"] = _parameters(tool)
        lines.append(json.dumps(described, ensure_ascii=False))
    lines += [
        "",
        "To call a tool, reply with only this JSON object and no other text:",
        json.dumps({"tool_calls": [_call_json("<tool name>", {"<argument>": "<value>"})]}),
    ]
    if forced:
        lines.append(f"You must call the tool {forced}.")
    elif required:
        lines.append("You must call a tool.")
    else:
        lines.append("If no tool is needed, answer in plain text.")
    lines.append("Call one tool per reply." if not parallel else "To call several tools, list several calls.")
    return "\n".join(lines)


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # the client's text, as it was


def _render_history(messages: Sequence[OpenAIChatMessage]) -> list[Message]:
    """The client's messages as template turns: tool calls as the call JSON, tool results as user turns."""
    rendered: list[Message] = []
    names: dict[str, str] = {}  # call id -> function name, for the calls the last assistant turn made
    tool_turn = False  # whether the last rendered message is a user turn holding tool results (or merged into one)
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        text = message.text()
        if role == "tool":
            call_id = message.tool_call_id or ""
            if call_id not in names:
                raise BadRequest(
                    f"messages.{index}.tool_call_id: {call_id!r} answers no tool call of the assistant message "
                    "before it (tool messages follow an assistant message with tool_calls)",
                    param=f"messages.{index}.tool_call_id",
                )
            result = f"Result of tool call {call_id} ({names[call_id]}):\n{text}"
            if rendered and rendered[-1].role == "user":
                result = f"{rendered[-1].content}\n\n{result}"
                rendered.pop()
            rendered.append(Message(role="user", content=result))
            tool_turn = True
            continue
        if role == "user" and tool_turn and rendered and rendered[-1].role == "user":
            rendered[-1] = Message(role="user", content=f"{rendered[-1].content}\n\n{text}")
            continue
        tool_turn = False
        if role == "assistant":
            names = {call.id: call.function.name for call in message.tool_calls or []}
            if message.tool_calls:
                calls = [
                    _call_json(c.function.name, _arguments_value(c.function.arguments)) for c in message.tool_calls
                ]
                text = "\n".join(filter(None, [text, json.dumps({"tool_calls": calls}, ensure_ascii=False)]))
        elif role != "system":
            names = {}
        rendered.append(Message(role=role, content=text))  # type: ignore[arg-type]
    return rendered


class ToolUse:
    """What a request's tool fields mean for its prompt, its constraint and its reply."""

    def __init__(self, body: OpenAIChatCompletionRequest) -> None:
        self.tools: tuple[OpenAITool, ...] = tuple(body.tools or ())
        choice = body.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise BadRequest("tool_choice: only allowed when tools are given", param="tool_choice")
        _check_tools(self.tools)
        self.forced: str | None = None
        if choice is not None and not isinstance(choice, str):
            self.forced = choice.function.name
            if self.forced not in {tool.function.name for tool in self.tools}:
                raise BadRequest(
                    f"tool_choice: no tool named {self.forced!r} in tools", param="tool_choice.function.name"
                )
        self.choice = "none" if not self.tools else ("named" if self.forced else choice or "auto")
        # A named function is one call of it (as vLLM decodes it), whatever parallel_tool_calls says.
        self.parallel = body.parallel_tool_calls is not False and self.forced is None
        self.messages = self._messages(body.messages)  # the prompt's
        self.response_format = self._call_format()  # the constraint a forced call puts on the reply, else None

    @property
    def active(self) -> bool:
        """Whether tools are offered, so the reply may be a call."""
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    def _messages(self, messages: Sequence[OpenAIChatMessage]) -> tuple[Message, ...]:
        """The prompt's messages: the tools' system text first (when offered), then the rendered history."""
        history = _render_history(messages)
        if not self.active:
            return tuple(history)
        prompt = tools_prompt(self.tools, self.forced, self.choice == "required", self.parallel)
        if history and history[0].role == "system":  # one system turn: the client's text, then the tools
            return (Message(role="system", content=f"{history[0].content}\n\n{prompt}"), *history[1:])
        return (Message(role="system", content=prompt), *history)

    def _call_format(self) -> ResponseFormat | None:
        if not self.constrained:
            return None
        tools = [t for t in self.tools if self.forced is None or t.function.name == self.forced]
        return ResponseFormat(kind="json_schema", schema=json.dumps(call_schema(tools, self.parallel)), strict=True)

    def parse(self, text: str) -> tuple[OpenAIToolCall, ...] | None:
        """The calls `text` makes, when it is exactly the call format naming offered tools; else None (text)."""
        if not self.active:
            return None
        body = text.strip()
        fenced = _FENCE.fullmatch(body)
        if fenced:
            body = fenced.group(1)
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or set(parsed) != {"tool_calls"}:
            return None
        calls = parsed["tool_calls"]
        allowed = {self.forced} if self.forced else {tool.function.name for tool in self.tools}
        if not isinstance(calls, list) or not calls or len(calls) > (MAX_PARALLEL_CALLS if self.parallel else 1):
            return None
        for call in calls:
            if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
                return None
            if call["name"] not in allowed or not isinstance(call["arguments"], dict):
                return None
        return tuple(
            OpenAIToolCall.model_validate(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
                }
            )
            for call in calls
        )

    def may_be_call(self, text: str) -> bool:
        """Whether a reply that starts with `text` could still turn out to be a call (so a stream holds it back)."""
        if self.constrained:
            return True
        start = text.lstrip()
        return self.active and (not start or start.startswith("{") or start.startswith("```"[: len(start)]))

    async def events(self, stream: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent | ToolCalls]:
        """The engine's stream with a call recognised: text deltas that may start a call are held back until the
        reply is known; a call becomes one ToolCalls event before the GenerationResult, else the held deltas pass.
        The route closes the engine's stream (`webapp.api.sse.closing`), not this."""
        held: list[TextDelta] = []
        holding = self.active
        async for event in stream:
            if isinstance(event, TextDelta) and holding:
                held.append(event)
                if not self.may_be_call("".join(delta.text for delta in held)):
                    for delta in held:
                        yield delta
                    held, holding = [], False
                continue
            if isinstance(event, GenerationResult) and holding:
                calls = self.parse(event.text)
                if calls:
                    yield ToolCalls(calls)
                else:
                    for delta in held:
                        yield delta
            yield event


def finish_reason(result: GenerationResult, calls: tuple[OpenAIToolCall, ...] | None) -> str:
    return "tool_calls" if calls else result.finish_reason


def tool_call_deltas(calls: Sequence[OpenAIToolCall]) -> list[OpenAIDelta]:
    """The stream's pieces of `calls`, as OpenAI sends them: per call, one delta with its index, id, type and name
    (arguments empty), then one with the arguments text."""
    deltas: list[OpenAIDelta] = []
    for index, call in enumerate(calls):
        start = OpenAIFunctionDelta(name=call.function.name, arguments="")
        deltas.append(
            OpenAIDelta(tool_calls=[OpenAIToolCallDelta(index=index, id=call.id, type="function", function=start)])
        )
        arguments = OpenAIFunctionDelta(arguments=call.function.arguments)
        deltas.append(OpenAIDelta(tool_calls=[OpenAIToolCallDelta(index=index, function=arguments)]))
    return deltas
