"""The OpenAPI document states what the server enforces: schemathesis, with its default checks, against the real app
(the embedded model, the default engine), in both directions.

- A body the document calls valid is accepted: schemathesis' `positive_data_acceptance`, replaced here by the same
  check with the listed exceptions (`schema_valid_bodies_are_accepted`). A 400 for a schema-valid body means the
  document leaves out a rule the server enforces (a `response_format` stated as a free-form object, say).
- A body the document calls invalid is refused (`negative_data_rejection`): accepting one means the document states
  a rule the server does not enforce.
- And the rest of the defaults: no 5xx, only declared status codes and content types, responses matching their
  schemas, auth enforced, 405 for undeclared methods.

Two runs. The first, of the served document, with every phase and both kinds of data. Its valid bodies seldom carry
an optional field (hypothesis leaves most of thirty out), so a second run sends valid bodies only, from the same
document with every property made required (`every_property_present`): each body then holds every field, each a
valid value, so a field whose rules the document leaves out is refused within a few examples. A body valid under
that variant is valid under the served document (it only adds `required`, never where that would widen what is
valid), so a refusal there is a misstatement of the served document too.

EXCEPTIONS are the rules no JSON Schema can state (a reference between items, a sum over fields, what the model's
template or context allows): a schema-valid body refused for one of them, with a 400 whose message says so, is not
a misstatement. Each is listed with the operations it may happen on and the reason.

Bounded and reproducible: a fixed seed, derandomized generation, a fixed number of examples per operation; the app
caps generation at 2 tokens and conversations at 300 characters (the document it serves says so, so valid bodies
stay cheap). About 1-2 minutes on two busy shared cores. tests/test_fuzz.py is the deeper run of invalid bodies.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import schemathesis
from schemathesis.checks import CHECKS
from schemathesis.engine import from_schema
from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, FuzzRecord, engine_for
from webapp.server import create_app
from webapp.settings import Settings

LIMITS = {"max_new_tokens_cap": 2, "max_total_chars": 300, "max_history_messages": 6}
EXAMPLES = 10  # per operation, in the first run's fuzzing phase (the coverage phase adds its boundary cases)
FULL_BODIES = 25  # per operation, in the second run (every property present)
SEED = 20261206
# What positive_data_acceptance takes as acceptance (schemathesis' default): 404 is an unknown `model`.
ACCEPTED = re.compile(r"2\d\d|3\d\d|401|403|404|409|429|5\d\d")

ANTHROPIC = ("POST /v1/messages", "POST /v1/messages/count_tokens")
CHAT_LIKE = ("POST /v1/chat/completions", "POST /v1/responses", *ANTHROPIC)
GENERATING = ("POST /api/v1/generate-text", "POST /api/v1/chat", "POST /v1/completions", *CHAT_LIKE)


@dataclass(frozen=True)
class Excused:
    """A 400 for a schema-valid body that is not a misstatement: `pattern` searched in the error message."""

    pattern: str
    operations: tuple[str, ...]
    reason: str


EXCEPTIONS = {
    "last turn": Excused(
        r"the conversation must end with a user message",
        CHAT_LIKE,
        "which role the last item of an array has: JSON Schema has no keyword for the last item",
    ),
    "unanswered call": Excused(
        r"answers no (tool call|function_call item|tool_use block)",
        CHAT_LIKE,
        "a tool result must answer a call of the turn before it: a reference between items",
    ),
    "named tool": Excused(
        r"no tool named",
        CHAT_LIKE,
        "a named tool_choice must be one of `tools`' names: a reference between fields",
    ),
    "duplicate tool": Excused(
        r"duplicate tool name",
        CHAT_LIKE,
        "tool names are unique: uniqueItems compares whole items, not one field of them",
    ),
    "total characters": Excused(
        r"above the limit of \d+ \(MAX_TOTAL_CHARS\)",
        GENERATING,
        "a sum over fields and items (each text field alone has its maxLength)",
    ),
    "converted history": Excused(
        r"earlier messages, above the limit of \d+ \(MAX_HISTORY_MESSAGES\)",
        ("POST /v1/responses", *ANTHROPIC),
        "counted on the chat messages the items become (instructions or system add one, calls merge, tool results "
        "split off); `maxItems` bounds the items alone",
    ),
    "unusable schema": Excused(
        r"json_schema\.schema is not usable|not a valid JSON Schema",
        ("POST /v1/completions", *CHAT_LIKE),
        "a JSON Schema the grammar compiler (llguidance) can enforce, or any valid JSON Schema (tools' parameters): "
        "the document says `type: object`, not the meta-schema",
    ),
    "template": Excused(
        r"chat template rejected the conversation",
        CHAT_LIKE,
        "the served model's chat template decides which orders of roles it takes",
    ),
    "context": Excused(
        r"above the model's context of \d+ tokens",
        GENERATING,
        "prompt tokens + max tokens against the model's context: tokens, not characters",
    ),
}


def _message(response: Any) -> str:
    try:
        body = json.loads(response.content)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # OpenAI's and Anthropic's shapes
        return str(error.get("message", ""))
    return str(body.get("detail", "")) if isinstance(body, dict) else ""


# What the custom check saw: how many 400s each exception excused, on which operation.
EXCUSED: Counter[tuple[str, str]] = Counter()
_CHECK = "schema_valid_bodies_are_accepted"


def schema_valid_bodies_are_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """positive_data_acceptance, with EXCEPTIONS: a case generated valid is accepted, or refused with a 400 that
    names one of the listed rules no JSON Schema states."""
    if case.meta is None or is_unexpected_http_status_case(case) or not case.meta.generation.mode.is_positive:
        return None
    if ACCEPTED.fullmatch(str(response.status_code)):
        return True
    message = _message(response)
    if response.status_code == 400:
        for name, exception in EXCEPTIONS.items():
            if case.operation.label in exception.operations and re.search(exception.pattern, message):
                EXCUSED[(name, case.operation.label)] += 1
                return True
    raise AssertionError(
        f"a body the OpenAPI document calls valid was refused ({response.status_code}): the document misses a "
        f"rule, or it belongs in EXCEPTIONS with its reason. The server said: {message[:300]}"
    )


def fuzz_config(*, full_bodies: bool = False) -> schemathesis.Config:
    checks: dict[str, Any] = {"positive_data_acceptance": {"enabled": False}}  # replaced by the check above
    phases: dict[str, Any] = {"stateful": {"enabled": False}}  # no links between operations
    if full_bodies:  # valid bodies only; the variant's responses are not the served document's to check
        checks = {"enabled": False, "not_a_server_error": {"enabled": True}, _CHECK: {"enabled": True}}
        phases.update(examples={"enabled": False}, coverage={"enabled": False})
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "continue-on-failure": True,
            "max-failures": 50,
            "request-timeout": 300,  # only a hung request meets it (two busy cores)
            "suppress-health-check": ["too_slow", "filter_too_much"],
            "headers": {"Authorization": f"Bearer {API_KEY}"},
            "generation": {
                "mode": "positive" if full_bodies else "all",
                "max-examples": FULL_BODIES if full_bodies else EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "checks": checks,
            "phases": phases,
        }
    )


# Subschemas where an added `required` could make more bodies valid, not fewer, left as they are: a condition, a
# negation, and `oneOf` (narrowing its branches could leave one match where there were two).
_NOT_NARROWED = ("if", "not", "else", "oneOf")


def every_property_present(node: Any) -> Any:
    """A copy of a schema (or of the whole document) with every object's properties required."""
    if isinstance(node, list):
        return [every_property_present(item) for item in node]
    if not isinstance(node, dict):
        return node
    copied = {key: value if key in _NOT_NARROWED else every_property_present(value) for key, value in node.items()}
    if isinstance(node.get("properties"), dict) and all(isinstance(v, dict) for v in node["properties"].values()):
        copied["required"] = list(node["properties"])
    return copied


def _run(schema: Any, record: FuzzRecord) -> None:
    for event in from_schema(schema).execute():
        record.add(event)


def test_the_openapi_document_states_what_the_server_enforces(embedded_model: LoadedModel) -> None:
    settings = Settings(model_id="embedded", _env_file=None, **LIMITS)  # type: ignore[call-arg]
    app = create_app(settings, engine_for(settings, embedded_model), [API_KEY], with_ui=False)
    served = schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config())
    full = schemathesis.openapi.from_dict(
        every_property_present(served.raw_schema), config=fuzz_config(full_bodies=True)
    )
    full.app = app
    operations = {f"{method.upper()} {path}" for path, item in served.raw_schema["paths"].items() for method in item}
    assert set(GENERATING) <= operations

    EXCUSED.clear()
    record = FuzzRecord()
    statuses, failures, errors = record.statuses, record.failures, record.errors
    schemathesis.check(schema_valid_bodies_are_accepted)  # registered for this test only (the registry is global)
    started = time.monotonic()
    try:
        _run(served, record)
        first = time.monotonic() - started
        _run(full, record)
    finally:
        CHECKS.unregister(_CHECK)
        app.state.engine.close()
    elapsed = time.monotonic() - started

    summary = ", ".join(f"{label} {code}: {n}" for (label, code), n in sorted(statuses.items()))
    excused = ", ".join(f"{name} on {label}: {n}" for (name, label), n in sorted(EXCUSED.items()))
    timing = f"{elapsed:.0f}s (served document {first:.0f}s, every property present {elapsed - first:.0f}s)"
    print(f"\nfuzz: {sum(statuses.values())} requests in {timing}; {summary}\nexcused 400s: {excused or 'none'}")
    assert not errors, "\n".join(errors)
    assert not failures, "schemathesis found:\n" + "\n".join(failures.values())
    # Not vacuous: every operation was called, valid bodies generated text, invalid ones were refused.
    for operation in operations:
        assert any(label == operation for label, _ in statuses), f"{operation} was never called"
    for operation in GENERATING:
        assert statuses[(operation, 200)] >= 3, f"too few accepted bodies on {operation}"
        assert statuses[(operation, 400)] >= 5, f"too few refused bodies on {operation}"
