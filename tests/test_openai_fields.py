"""Promises of docs/api.md about request fields, on the real embedded model: `max_completion_tokens` and the `developer`
role on /v1/chat/completions, and the limit of 4 stop sequences on every generation route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers import AUTH

# A greedy reply to this runs well past 8 tokens (a list of seven days), so a token limit is what ends it.
LISTING = "Sebutkan nama-nama hari dalam seminggu."
GENERATION_PATHS = ["/api/v1/generate-text", "/api/v1/chat", "/v1/chat/completions"]


def completion(client: TestClient, messages: list[dict[str, str]], **fields: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", headers=AUTH, json={"messages": messages, "temperature": 0, **fields})


def listing(client: TestClient, **fields: Any) -> dict:
    response = completion(client, [{"role": "user", "content": LISTING}], **fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_max_completion_tokens_bounds_the_reply_and_wins_over_max_tokens(client: TestClient) -> None:
    newer = listing(client, max_completion_tokens=3)
    assert newer["usage"]["completion_tokens"] == 3 and newer["choices"][0]["finish_reason"] == "length"
    older = listing(client, max_tokens=5)
    assert older["usage"]["completion_tokens"] == 5
    # Greedy: the 3-token reply is the start of the 5-token one.
    assert older["choices"][0]["message"]["content"].startswith(newer["choices"][0]["message"]["content"])
    both = listing(client, max_tokens=5, max_completion_tokens=2)  # the newer field wins
    assert both["usage"]["completion_tokens"] == 2

    cap = client.app.state.settings.max_new_tokens_cap  # type: ignore[attr-defined]
    over = completion(client, [{"role": "user", "content": LISTING}], max_completion_tokens=cap + 1)
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["param"] == "max_completion_tokens" and "max_completion_tokens" in error["message"]
    assert str(cap) in error["message"]


def test_the_developer_role_is_a_system_message(client: TestClient) -> None:
    instruction = "Jawab hanya dengan satu kata."
    question = {"role": "user", "content": "Apa ibu kota Indonesia?"}
    as_system = completion(client, [{"role": "system", "content": instruction}, question], max_tokens=6)
    as_developer = completion(client, [{"role": "developer", "content": instruction}, question], max_tokens=6)
    bare = completion(client, [question], max_tokens=6)
    assert as_developer.status_code == as_system.status_code == bare.status_code == 200, as_developer.text
    # The same prompt (token for token: same count, same greedy reply) as the system message gives ...
    assert as_developer.json()["usage"] == as_system.json()["usage"]
    assert as_developer.json()["choices"] == as_system.json()["choices"]
    # ... and that prompt is not the one without the instruction (the instruction was not dropped).
    assert as_system.json()["usage"]["prompt_tokens"] != bare.json()["usage"]["prompt_tokens"]


def generation_body(path: str, text: str, max_new_tokens: int, **fields: Any) -> dict:
    if path.startswith("/v1/"):
        return {"messages": [{"role": "user", "content": text}], "max_tokens": max_new_tokens, **fields}
    return {"text": text, "max_new_tokens": max_new_tokens, **fields}


def error_message(path: str, response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if path.startswith("/v1/") else body["detail"]


@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_a_fifth_stop_sequence_is_a_400_that_says_so(client: TestClient, path: str) -> None:
    five = ["<a>", "<b>", "<c>", "<d>", "<e>"]
    response = client.post(path, headers=AUTH, json=generation_body(path, "Halo", 1, stop=five))
    assert response.status_code == 400, response.text
    message = error_message(path, response)
    assert "stop" in message and "at most 4" in message, message
    if path.startswith("/v1/"):
        assert response.json()["error"]["param"] == "stop"


@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_four_stop_sequences_are_accepted_and_each_applies(client: TestClient, path: str) -> None:
    base = generation_body(path, LISTING, 16, temperature=0)

    def text_of(response: httpx.Response) -> str:
        assert response.status_code == 200, response.text
        body = response.json()
        return body["choices"][0]["message"]["content"] if path.startswith("/v1/") else body["generated_text"]

    full = text_of(client.post(path, headers=AUTH, json=base))
    assert len(full) > 12, full
    match = full[8:11]
    # The match is the 4th of 4: every one of them is checked, and the match is not returned.
    stops = ["<zz1>", "<zz2>", "<zz3>", match]
    cut = text_of(client.post(path, headers=AUTH, json={**base, "stop": stops}))
    assert cut == full[: full.find(match)]
