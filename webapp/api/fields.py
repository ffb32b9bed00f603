"""What every protocol shares: strict request models, valid Unicode text, stop sequences, defaults, and the limits
every builder checks (MAX_HISTORY_MESSAGES, MAX_TOTAL_CHARS, MAX_NEW_TOKENS_CAP) as 400s naming the field and the
setting."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

from webapp.errors import BadRequest
from webapp.settings import Settings

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


def schema_is(replacement: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A field's `json_schema_extra` that states its accepted shapes exactly (`replacement`), where the Python type is
    wider so that a builder can refuse the rest with a message naming the field (free-form dicts checked by hand,
    fields accepted only at the value that means "off"). The title and description are kept."""

    def edit(schema: dict[str, Any]) -> None:
        kept = {key: schema[key] for key in ("title", "description", "default") if key in schema}
        schema.clear()
        schema.update(copy.deepcopy(replacement), **kept)

    return edit


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema with its `$defs` inlined, to embed in a field's schema (the model has no route of its
    own, so it has no component in the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inlined(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inlined(defs[ref.removeprefix("#/$defs/")])
            return {key: inlined(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inlined(item) for item in node]
        return node

    return inlined(schema)


NULL: dict[str, Any] = {"type": "null"}


def format_kind(kind: str, required: tuple[str, ...] | None = None, **properties: Any) -> dict[str, Any]:
    """One shape of a response format (`{"type": kind, ...}`, nothing else), for the OpenAPI document's oneOf lists:
    every property required unless `required` names which."""
    return {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": [kind]}, **properties},
        "required": ["type", *(properties if required is None else required)],
        "additionalProperties": False,
    }


def when(field: str, value: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """A rule between fields, in JSON Schema: if `field` is present and matches `value`, the body matches `then`
    (e.g. `top_logprobs` needs `"logprobs": true`). Listed under the model's `allOf`."""
    return {"if": {"properties": {field: value}, "required": [field]}, "then": then}


def field_is(field: str, value: dict[str, Any]) -> dict[str, Any]:
    """`then`: `field` is present and matches `value`."""
    return {"properties": {field: value}, "required": [field]}


def field_absent_or(field: str, value: dict[str, Any]) -> dict[str, Any]:
    """`then`: `field` is absent, or matches `value`."""
    return {"properties": {field: value}}


# A tool_choice that forces a call (the reply is the call) takes no JSON response format.
FORCED_CALL: dict[str, Any] = {"anyOf": [{"const": "required"}, {"type": "object"}]}
TEXT_FORMAT_ONLY: dict[str, Any] = {"anyOf": [NULL, {"type": "object", "properties": {"type": {"const": "text"}}}]}

# Every OpenAI route: `stream_options` only with `"stream": true`.
STREAM_OPTIONS_NEED_STREAM = when("stream_options", {"type": "object"}, field_is("stream", {"const": True}))


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


class ErrorResponse(BaseModel):
    detail: str


def check_conversation_limits(
    settings: Settings, *, history_messages: int, total_chars: int, history_field: str, text_field: str
) -> None:
    """MAX_HISTORY_MESSAGES and MAX_TOTAL_CHARS, as 400s naming the field and the setting."""
    if history_messages > settings.max_history_messages:
        raise BadRequest(
            f"{history_field}: {history_messages} earlier messages, above the limit of "
            f"{settings.max_history_messages} (MAX_HISTORY_MESSAGES)",
            param=history_field,
        )
    if total_chars > settings.max_total_chars:
        raise BadRequest(
            f"{text_field}: the messages hold {total_chars} characters together, above the limit of "
            f"{settings.max_total_chars} (MAX_TOTAL_CHARS)",
            param=text_field,
        )


def check_max_new_tokens(value: int, cap: int, field: str = "max_new_tokens") -> None:
    if value > cap:
        raise BadRequest(f"{field}: must be at most {cap} (MAX_NEW_TOKENS_CAP)", param=field)
