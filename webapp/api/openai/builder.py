"""An OpenAI body -> `GenerationRequest`(s): refused fields, limits, sampling; tools and response_format resolved
once.

`response_format` -> `inference.ResponseFormat` (or None for plain text), one parser for every route that takes the
field (/v1/chat/completions, /v1/completions, tool calls' arguments):
- `{"type": "text"}` (or no field): no constraint;
- `{"type": "json_object"}`: the reply is one JSON object;
- `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true, "description": ...}}`:
  the reply validates against `schema` (`strict`, default false as in OpenAI's API, is honoured by the engine).

The shape is checked here (400 naming `response_format`); whether the engine can enforce the schema is checked by
the engine at submit (`InvalidRequest`, also a 400). The schema is carried as canonical JSON text (sorted keys), so
the same schema always hits the same compiled grammar.
"""

from __future__ import annotations

import json
import re
from typing import Any

from inference import GenerationRequest, ResponseFormat
from webapp.api.fields import DEFAULT_MAX_NEW_TOKENS, check_conversation_limits, check_max_new_tokens
from webapp.api.openai.completions_protocol import CompletionRequest
from webapp.api.openai.protocol import OpenAIChatCompletionRequest
from webapp.api.openai.tools import ToolUse
from webapp.errors import BadRequest
from webapp.settings import Settings

FIELD = "response_format"
TYPES = ("text", "json_object", "json_schema")
JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _refuse(message: str, param: str = FIELD) -> BadRequest:
    return BadRequest(f"{FIELD}: {message}", param=param)


def parse_response_format(value: Any, param: str = FIELD) -> ResponseFormat | None:
    """The `ResponseFormat` a request body's `response_format` asks for; None for text. BadRequest if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _refuse('must be an object such as {"type": "json_object"}', param)
    kind = value.get("type")
    if kind not in TYPES:
        raise _refuse(f"type must be one of {', '.join(repr(t) for t in TYPES)} (got {json.dumps(kind)})", param)
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra or (kind != "json_schema" and "json_schema" in value):
        unknown = extra or ["json_schema"]
        raise _refuse(f"unexpected field(s) for type {kind!r}: {', '.join(unknown)}", param)
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(kind="json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _refuse('type "json_schema" needs a json_schema object: {"name": ..., "schema": {...}}', param)
    unknown = sorted(set(spec) - JSON_SCHEMA_KEYS)
    if unknown:
        raise _refuse(f"json_schema has unknown field(s): {', '.join(unknown)}", param)
    name = spec.get("name", "response")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _refuse("json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -", param)
    if "schema" not in spec:
        raise _refuse("json_schema.schema is required (a JSON Schema object)", param)
    schema = spec["schema"]
    if not isinstance(schema, dict):
        raise _refuse("json_schema.schema must be a JSON Schema object", param)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _refuse("json_schema.strict must be true or false", param)
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise _refuse("json_schema.description must be a string", param)
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    return ResponseFormat(kind="json_schema", schema=text, strict=bool(strict), name=name)


def _check_openai_body(body: OpenAIChatCompletionRequest | CompletionRequest) -> None:
    """What both OpenAI routes refuse before any work: fields set to what this server does not do."""
    refused = body.unsupported()
    if refused is not None:
        field, reason = refused
        raise BadRequest(f"{field}: {reason}", param=field)
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options: only allowed with stream=true", param="stream_options")


def _openai_sampling(body: OpenAIChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The sampling knobs both OpenAI routes take, as GenerationRequest fields."""
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": tuple(body.stop_list()),
    }


def openai_request(
    body: OpenAIChatCompletionRequest, settings: Settings, *, request_id: str
) -> tuple[GenerationRequest, ToolUse]:
    """The request for the engine, and the request's tool use (the route parses the reply with it): built once."""
    _check_openai_body(body)
    tools = ToolUse(body)  # tools, tool_choice and the history's tool turns (webapp.api.openai.tools)
    messages = tools.messages
    check_conversation_limits(
        settings,
        history_messages=len(body.messages) - 1,
        total_chars=sum(
            len(m.text()) + sum(len(c.function.arguments) for c in m.tool_calls or []) for m in body.messages
        ),
        history_field="messages",
        text_field="messages",
    )
    cap = settings.max_new_tokens_cap
    for field in ("max_tokens", "max_completion_tokens"):  # each explicit value is checked, even the unused one
        value = getattr(body, field)
        if value is not None:
            check_max_new_tokens(value, cap, field)
    # max_completion_tokens wins over the older max_tokens; the default is lowered to a cap below it.
    max_new_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_NEW_TOKENS, cap)
    response_format = parse_response_format(body.response_format)
    forced_call = tools.response_format  # tool_choice `required` or a named function: the reply is the call
    if forced_call is not None and response_format is not None:
        raise BadRequest(
            "response_format: a JSON response_format cannot be combined with a tool_choice that forces a call "
            "(the reply is the call)",
            param="response_format",
        )
    generation = GenerationRequest(
        messages=messages,
        max_new_tokens=max_new_tokens,
        request_id=request_id,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        response_format=forced_call or response_format,
        **_openai_sampling(body),
    )
    return generation, tools


def completion_request(body: CompletionRequest, settings: Settings, *, request_id: str) -> list[GenerationRequest]:
    """One raw-prompt request per prompt of the list (the batched engine runs them together)."""
    _check_openai_body(body)
    prompts = body.prompts()
    total_chars = sum(len(p) for p in prompts)
    if total_chars > settings.max_total_chars:
        raise BadRequest(
            f"prompt: the prompts hold {total_chars} characters together, above the limit of "
            f"{settings.max_total_chars} (MAX_TOTAL_CHARS)",
            param="prompt",
        )
    cap = settings.max_new_tokens_cap
    if "max_tokens" in body.model_fields_set:
        check_max_new_tokens(body.max_tokens, cap, "max_tokens")
    max_new_tokens = min(body.max_tokens, cap)  # the default is lowered to a cap below it
    response_format = parse_response_format(body.response_format)
    return [
        GenerationRequest(
            messages=(),
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            logprobs=body.logprobs,
            response_format=response_format,
            request_id=request_id,
            **_openai_sampling(body),
        )
        for prompt in prompts
    ]
