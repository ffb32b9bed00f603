"""Errors in OpenAI's shape on every /v1 path, as the official client reads them: unknown routes (404), wrong methods
(405 with Allow), malformed JSON (`param` null, not a character offset), validation errors (`param` = the field),
and the /api/v1 routes keeping the spec's `{"detail"}`. Against a real server with the chat page mounted at `/`
(whose catch-all otherwise answers every unknown path with Gradio's `{"detail": "Not Found"}`)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import AUTH, LiveServer

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_KEYS, body
    return body["error"]


@pytest.mark.parametrize("path", ["/embeddings", "/v1/nope", "/"])
def test_an_unknown_v1_route_is_a_404_the_client_can_read(oai: openai.OpenAI, path: str) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        oai.post(path, cast_to=object, body={"input": "x"})
    error = raised.value.body
    assert isinstance(error, dict) and set(error) == OPENAI_ERROR_KEYS
    assert "no such route" in raised.value.message and f"POST /v1{path}".rstrip("/") in raised.value.message
    assert error["type"] == "not_found_error" and error["param"] is None


@pytest.mark.parametrize(
    ("method", "path", "allow"), [("GET", "/chat/completions", "POST"), ("DELETE", "/models", "GET")]
)
def test_a_wrong_method_is_a_405_with_allow(live_server: LiveServer, oai: openai.OpenAI, method, path, allow) -> None:
    response = httpx.request(method, f"{live_server.base_url}/v1{path}", headers=AUTH, timeout=60)
    assert response.status_code == 405 and response.headers["allow"].split(", ")[0] == allow
    error = openai_error(response)
    assert "method not allowed" in error["message"] and allow in error["message"]
    if method == "GET":
        with pytest.raises(openai.APIStatusError) as raised:
            oai.get(path, cast_to=object)
        assert raised.value.status_code == 405 and "allows POST" in raised.value.message


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_malformed_json_is_a_400_with_param_null(oai: openai.OpenAI, path: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.post(
            path,
            cast_to=object,
            content=b'{"model": "sahabat-ai", "prompt": [}',
            options={"headers": {"Content-Type": "application/json"}},
        )
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] is None  # was "28": a character offset, not a field
    assert "not valid JSON" in raised.value.message


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ("/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ("/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/completions", {"max_tokens": 2}, "prompt"),
    ],
)
def test_a_validation_error_names_the_field_in_param(oai: openai.OpenAI, path: str, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.post(path, cast_to=object, body={"model": "sahabat-ai", **body})
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == param and param in raised.value.message


def test_other_statuses_on_v1_are_openai_shaped_too(live_server: LiveServer) -> None:
    url = f"{live_server.base_url}/v1"
    unauthorized = httpx.post(f"{url}/completions", json={"prompt": "hi"}, timeout=60)
    assert unauthorized.status_code == 401 and openai_error(unauthorized)["type"] == "authentication_error"
    too_big = httpx.post(f"{url}/completions", headers=AUTH, json={"prompt": "x" * 2_000_000}, timeout=60)
    assert too_big.status_code == 413 and "MAX_BODY_BYTES" in openai_error(too_big)["message"]


def test_the_spec_routes_keep_the_spec_shape(live_server: LiveServer) -> None:
    url = f"{live_server.base_url}/api/v1"
    wrong_method = httpx.get(f"{url}/chat", headers=AUTH, timeout=60)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert set(wrong_method.json()) == {"detail"}
    unknown = httpx.post(f"{url}/nope", headers=AUTH, json={}, timeout=60)
    assert unknown.status_code == 404 and set(unknown.json()) == {"detail"}
    malformed = httpx.post(
        f"{url}/chat", headers={**AUTH, "Content-Type": "application/json"}, content=b'{"text": ', timeout=60
    )
    assert malformed.status_code == 400 and "JSON" in malformed.json()["detail"]
    # ... and the page still has the rest of the site.
    assert httpx.get(f"{live_server.base_url}/", timeout=60).status_code == 200


USER_THEN_ASSISTANT = [{"role": "user", "content": "Halo"}, {"role": "assistant", "content": "Hai"}]
STRICT_UNSUPPORTED = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
# The engine's 400s (raised at submit, after the builders) name the field too, in each route's own names.
ENGINE_400S = {
    "chat, last turn": ("/v1/chat/completions", {"messages": USER_THEN_ASSISTANT}, "messages", "end with a user"),
    "responses, last turn": ("/v1/responses", {"input": USER_THEN_ASSISTANT}, "input", "end with a user"),
    "completions, context": ("/v1/completions", {"prompt": "halo " * 9000}, "prompt", "context of"),
    "responses, schema": (
        "/v1/responses",
        {
            "input": "Halo",
            "text": {"format": {"type": "json_schema", "name": "x", "schema": STRICT_UNSUPPORTED, "strict": True}},
        },
        "text.format",
        "uniqueItems",
    ),
    "chat, a forced call's parameters": (
        "/v1/chat/completions",
        {
            "messages": USER_THEN_ASSISTANT[:1],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": STRICT_UNSUPPORTED}}],
            "tool_choice": "required",
        },
        "tools",
        "uniqueItems",
    ),
}


@pytest.mark.parametrize("case", ENGINE_400S)
def test_an_engine_400_names_the_field_in_param(live_server: LiveServer, case: str) -> None:
    path, body, param, words = ENGINE_400S[case]
    tokens = {"max_output_tokens" if path == "/v1/responses" else "max_tokens": 1}
    response = httpx.post(f"{live_server.base_url}{path}", headers=AUTH, json={**body, **tokens}, timeout=120)
    assert response.status_code == 400, response.text
    error = openai_error(response)
    assert error["param"] == param and words in error["message"], error
