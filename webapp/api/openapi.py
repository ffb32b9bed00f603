"""The OpenAPI schema, with the limits of this deployment written into it."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI

from webapp.settings import Settings

_TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens", "max_output_tokens")
# Top-level text fields counted in MAX_TOTAL_CHARS: each alone is at most that long (the sum is the builders' check).
_TEXT_FIELDS = ("text", "system_message", "prompt", "input", "instructions", "system")


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that documents the configured limits and the real error codes.

    - `max_new_tokens` / `max_tokens` / `max_completion_tokens` / `max_output_tokens` get `maximum:
      MAX_NEW_TOKENS_CAP`; `conversation_history` and `messages` get `maxItems` from MAX_HISTORY_MESSAGES; the text
      fields counted in MAX_TOTAL_CHARS (`text`, `prompt`, `input`, ...) get it as `maxLength`.
    - Component schemas no operation refers to (left behind by a field whose schema was narrowed) are dropped.
    - FastAPI's automatic 422 is removed: validation errors are answered with 400 here
      (webapp/errors.py), which every route declares.
    """

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_limits(generate(), settings)  # FastAPI caches the schema it returns; edited in place
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_limits(schema: dict[str, Any], settings: Settings) -> None:
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    for model in components.values():
        properties = model.get("properties", {})
        for name in _TOKEN_FIELDS:
            if name in properties:
                _set_in_numeric_schema(properties[name], "maximum", settings.max_new_tokens_cap)
        if "conversation_history" in properties:
            _set_in_array_schema(properties["conversation_history"], settings.max_history_messages)
        if "messages" in properties:
            _set_in_array_schema(properties["messages"], settings.max_history_messages + 1)
        for name in _TEXT_FIELDS:
            if name in properties:
                _set_in_string_schema(properties[name], settings.max_total_chars)
    _drop_unreferenced(schema)


def _set_in_string_schema(field: dict[str, Any], max_length: int) -> None:
    """The string branches of `field`, and the strings of its array branches (a list of prompts)."""
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "string":
            branch["maxLength"] = max_length
        elif branch.get("type") == "array" and branch.get("items", {}).get("type") == "string":
            branch["items"]["maxLength"] = max_length


def _drop_unreferenced(schema: dict[str, Any]) -> None:
    components = schema.get("components", {}).get("schemas", {})
    while True:
        used = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(schema)))
        unused = [name for name in components if name not in used]
        if not unused:
            return
        for name in unused:
            del components[name]


def _set_in_numeric_schema(field: dict[str, Any], key: str, value: int) -> None:
    """`field` is `{"type": "integer"}` or `{"anyOf": [{"type": "integer"}, {"type": "null"}]}`."""
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "integer":
            branch[key] = value


def _set_in_array_schema(field: dict[str, Any], max_items: int) -> None:
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "array":
            branch["maxItems"] = max_items
