"""Schemathesis fuzzing of the app's own OpenAPI schema: every route, a valid key, real generation.

The run uses schemathesis' own engine (the one behind `schemathesis run`) in-process over ASGI:
the examples phase, the coverage phase (boundary values, missing or wrong auth, undeclared methods,
each schema constraint broken in turn) and the fuzzing phase (random valid and invalid bodies). The
fuzzed app runs with small limits, so generations stay one token long, prompts stay short, and the
limits themselves are exercised: the schema it serves says `maximum: 1` for `max_new_tokens`,
`maxItems`/`maxLength` for history and text.

Checks: no 5xx from any input, no status code or content type the schema does not declare, responses
match their schemas (error bodies included), invalid data is refused with a 4xx, operations that
declare auth enforce it, undeclared methods get 405, and (custom) every error body is JSON with a
non-empty message. `FUZZ_EXAMPLES` raises the fuzzing phase's examples for a deeper local run.

The run's size is set by example counts and a fixed seed, not by a clock: about 25 s on two busy shared cores,
longer on a slower or busier machine, the same cases either way. `FUZZ_TIME_BUDGET_S` stops a deep local run
early; a run stopped that way reports what it covered instead of asserting the coverage floors, which only a
whole run can meet (what it found is still asserted).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import from_schema

from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, FuzzRecord, engine_for
from webapp.server import create_app
from webapp.settings import Settings

FUZZ_SETTINGS = {
    "max_new_tokens_cap": 1,
    "max_total_chars": 300,
    "max_history_messages": 6,
    "max_body_bytes": 16 * 1024,
}
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
# Unset: no budget. (Not schemathesis' `max-time`, which makes the fuzzing phase repeat until the time is used up.)
TIME_BUDGET_S = float(os.environ["FUZZ_TIME_BUDGET_S"]) if os.environ.get("FUZZ_TIME_BUDGET_S") else None


@schemathesis.check
def error_body_is_json_with_a_message(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is JSON: `{"detail": "..."}` on /api and /health, OpenAI's `{"error": {"message"}}` on /v1."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    if not content_type.startswith("application/json"):
        raise AssertionError(f"error {response.status_code} has content type {content_type!r}, not JSON")
    try:
        body = json.loads(response.content)
    except ValueError as error:
        raise AssertionError(f"error {response.status_code} body is not JSON: {response.content[:200]!r}") from error
    message = body.get("error", {}).get("message") if case.path.startswith("/v1/") else body.get("detail")
    if not isinstance(message, str) or len(message.strip()) < 5:
        raise AssertionError(f"error {response.status_code} has no useful message: {body!r}")
    return True


def fuzz_config(examples: int) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": 20240611,  # the same cases every run, so a failure in CI reproduces locally
            "max-failures": 50,
            "continue-on-failure": True,
            # No clock decides a case: schemathesis' 10 s default read timeout (hit at load 8 on two cores) is
            # raised to a limit that only a hung request meets, and hypothesis' "too slow" health check is off.
            "request-timeout": 300,
            "suppress-health-check": ["too_slow"],
            "headers": {"Authorization": f"Bearer {API_KEY}"},
            "generation": {"mode": "all", "max-examples": examples, "database": "none"},  # no .hypothesis/ files
            "checks": {
                # Valid JSON can still be refused on purpose (a conversation ending with an assistant turn,
                # a template that rejects the roles' order): that is a 400, not a schema violation.
                "positive_data_acceptance": {"enabled": False},
                # A body too big for MAX_BODY_BYTES is a 413, which is a refusal too.
                "negative_data_rejection": {"expected-statuses": ["400", "401", "405", "413"]},
            },
            "phases": {
                # Coverage: every constraint broken in turn, missing auth, undeclared methods. Its positive
                # boundary cases (a few hundred generations) are left to the fuzzing phase and to
                # test_sampling_knobs_at_their_documented_extremes_generate, to keep the run short.
                "coverage": {"generation": {"mode": "negative"}},
                "stateful": {"enabled": False},  # no links between operations: nothing to chain
            },
        }
    )


def test_fuzz_every_route_against_the_openapi_schema(embedded_model: LoadedModel) -> None:
    settings = Settings(model_id="embedded", _env_file=None, **FUZZ_SETTINGS)  # type: ignore[call-arg]
    app = create_app(settings, engine_for(settings, embedded_model), [API_KEY], with_ui=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config(FUZZ_EXAMPLES))
    operations = {f"{method.upper()} {path}" for path, item in app.openapi()["paths"].items() for method in item}
    assert {"POST /api/v1/generate-text", "POST /api/v1/chat", "POST /v1/chat/completions", "GET /v1/models"} <= (
        operations
    )

    started = time.monotonic()
    record = FuzzRecord()
    statuses, failures, errors = record.statuses, record.failures, record.errors
    stream = from_schema(schema).execute()
    stopped_early = False
    for event in stream:
        if TIME_BUDGET_S is not None and not stopped_early and time.monotonic() - started > TIME_BUDGET_S:
            stream.stop()
            stopped_early = True
        record.add(event)
    elapsed = time.monotonic() - started

    summary = ", ".join(f"{label} {code}: {n}" for (label, code), n in sorted(statuses.items()))
    note = f" (stopped at FUZZ_TIME_BUDGET_S={TIME_BUDGET_S:g})" if stopped_early else ""
    print(f"\nfuzz: {sum(statuses.values())} requests in {elapsed:.0f}s{note}; {summary}")
    assert not errors, "\n".join(errors)
    assert not failures, "schemathesis found:\n" + "\n".join(failures.values())
    if stopped_early:  # a partial run: say what it covered, and do not hold it to a whole run's floors
        warnings.warn(f"fuzz run stopped early{note}: {sum(statuses.values())} requests; {summary}", stacklevel=1)
        return
    # Not vacuous: every operation was reached, real generations ran, and the limits were hit.
    for operation in operations:
        assert any(label == operation for label, _ in statuses), f"{operation} was never called"
    for operation in ("POST /api/v1/generate-text", "POST /api/v1/chat", "POST /v1/chat/completions"):
        assert statuses[(operation, 200)] >= 5, f"too few successful generations on {operation}"
        assert statuses[(operation, 400)] >= 20, f"too few refused bodies on {operation}"
        assert statuses[(operation, 401)] >= 1, f"auth was never probed on {operation}"
    assert sum(statuses.values()) >= 400


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 5e-324},  # subnormal: logits / temperature overflowed to inf -> NaN -> 500 (fuzz find)
        {"temperature": 1e-40},
        {"temperature": 2.0, "top_p": 5e-324},
        {"temperature": 2.0, "top_k": 1000, "top_p": 1.0, "repetition_penalty": 0.5},
        {"temperature": 2.0, "top_k": 1, "repetition_penalty": 2.0, "seed": 2**32 - 1},
        {"temperature": 2.0, "min_p": 1.0, "presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"temperature": 2.0, "min_p": 5e-324, "top_p": 5e-324, "presence_penalty": 2, "frequency_penalty": -2},
    ],
)
def test_sampling_knobs_at_their_documented_extremes_generate(client: Any, sampling: dict) -> None:
    from tests.helpers import AUTH

    body = {"text": "Halo, apa kabar?", "max_new_tokens": 2, **sampling}
    response = client.post("/api/v1/generate-text", headers=AUTH, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["output_length"] >= 1
    oai = {"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 2, **sampling}
    assert client.post("/v1/chat/completions", headers=AUTH, json=oai).status_code == 200
