"""The OpenAI `response_format` request field -> `inference.ResponseFormat` (or None for plain text).

One parser for every route that takes the field (/v1/chat/completions, /v1/completions, tool calls' arguments):
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

from inference import ResponseFormat
from webapp.errors import BadRequest

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
