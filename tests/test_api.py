"""The documented endpoints, against the real embedded model."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.helpers import AUTH, ForcedFault, both_engines

pytestmark = both_engines  # the engine users get (batched), and the sequential one: the same behaviour

SPEC_PATHS = ["/api/v1/generate-text", "/api/v1/chat"]


@pytest.mark.parametrize("path", SPEC_PATHS)
def test_response_shape_and_types(client: TestClient, path: str) -> None:
    response = client.post(path, headers=AUTH, json={"text": "Apa ibu kota Indonesia?", "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"generated_text", "full_conversation", "model", "input_length", "output_length"}
    assert isinstance(body["generated_text"], str) and body["generated_text"]
    assert body["model"] == "SmolLM2-135M-Instruct-Q4_1"
    assert 0 < body["output_length"] <= 8
    assert body["input_length"] > 5
    assert body["full_conversation"][-1] == {"role": "assistant", "content": body["generated_text"]}
    assert body["full_conversation"][-2] == {"role": "user", "content": "Apa ibu kota Indonesia?"}


def test_chat_adds_automatic_system_message(client: TestClient) -> None:
    body = client.post("/api/v1/chat", headers=AUTH, json={"text": "Halo", "max_new_tokens": 4}).json()
    first = body["full_conversation"][0]
    assert first["role"] == "system" and "Indonesian" in first["content"]
    plain = client.post("/api/v1/generate-text", headers=AUTH, json={"text": "Halo", "max_new_tokens": 4}).json()
    assert plain["full_conversation"][0]["role"] == "user"
    assert body["input_length"] > plain["input_length"]  # the system message reached the prompt


def test_history_and_system_message_reach_the_prompt(client: TestClient) -> None:
    history = [
        {"role": "user", "content": "Apa iku Punakawan?"},
        {"role": "assistant", "content": "Punakawan minangka karakter ing wayang..."},
    ]
    base = {"text": "Jelasne luwih rinci", "max_new_tokens": 4, "temperature": 0}
    bare = client.post("/api/v1/generate-text", headers=AUTH, json=base).json()
    full = client.post(
        "/api/v1/generate-text",
        headers=AUTH,
        json={**base, "conversation_history": history, "system_message": "Jawab nganggo basa Jawa."},
    ).json()
    assert full["full_conversation"][:3] == [{"role": "system", "content": "Jawab nganggo basa Jawa."}, *history]
    assert full["input_length"] > bare["input_length"] + 15


def test_greedy_is_reproducible(client: TestClient) -> None:
    body = {"text": "Sebutkan tiga pulau di Indonesia.", "max_new_tokens": 12, "temperature": 0}
    first = client.post("/api/v1/generate-text", headers=AUTH, json=body).json()
    second = client.post("/api/v1/generate-text", headers=AUTH, json=body).json()
    assert first["generated_text"] == second["generated_text"]


def test_seed_is_reproducible(client: TestClient) -> None:
    body = {"text": "Tulis puisi pendek tentang laut.", "max_new_tokens": 16, "temperature": 1.0}
    texts = {
        seed: [
            client.post("/api/v1/generate-text", headers=AUTH, json={**body, "seed": seed}).json()["generated_text"]
            for _ in range(2)
        ]
        for seed in (1, 2)
    }
    assert texts[1][0] == texts[1][1]
    assert texts[2][0] == texts[2][1]
    assert texts[1][0] != texts[2][0]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "text"),
        ({"text": ""}, "text"),
        ({"text": "   "}, "text"),
        ({"text": 5}, "text"),
        ({"text": "hi", "temperature": -0.1}, "temperature"),
        ({"text": "hi", "temperature": 2.5}, "temperature"),
        ({"text": "hi", "temperature": "hot"}, "temperature"),
        ({"text": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"text": "hi", "max_new_tokens": 999999}, "max_new_tokens"),
        ({"text": "hi", "max_new_tokens": 1.5}, "max_new_tokens"),
        ({"text": "hi", "conversation_history": [{"role": "robot", "content": "x"}]}, "role"),
        ({"text": "hi", "conversation_history": [{"role": "user"}]}, "content"),
        ({"text": "hi", "conversation_history": "nope"}, "conversation_history"),
        ({"text": "hi", "maxtokens": 5}, "maxtokens"),
    ],
)
@pytest.mark.parametrize("path", SPEC_PATHS)
def test_invalid_requests_are_400_naming_the_field(client: TestClient, path: str, payload: dict, field: str) -> None:
    response = client.post(path, headers=AUTH, json=payload)
    assert response.status_code == 400, response.text
    assert field in response.json()["detail"]


@pytest.mark.parametrize("path", SPEC_PATHS)
def test_malformed_json_is_400(client: TestClient, path: str) -> None:
    response = client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=b'{"text": ')
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]


def test_prompt_longer_than_context_is_400_with_both_numbers(client: TestClient) -> None:
    response = client.post("/api/v1/generate-text", headers=AUTH, json={"text": "kata " * 9000, "max_new_tokens": 100})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "8192" in detail and "100" in detail


@pytest.mark.parametrize("path", SPEC_PATHS)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}],
)
def test_missing_or_wrong_key_is_401(client: TestClient, path: str, headers: dict) -> None:
    response = client.post(path, headers=headers, json={"text": "hi", "max_new_tokens": 2})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "wrong-key" not in response.text


def test_every_configured_key_works(client: TestClient) -> None:
    response = client.post(
        "/api/v1/chat", headers={"Authorization": "Bearer second-key"}, json={"text": "hi", "max_new_tokens": 2}
    )
    assert response.status_code == 200


def test_generation_fault_is_500_and_service_recovers(client: TestClient, engine) -> None:
    with ForcedFault(engine):
        response = client.post("/api/v1/generate-text", headers=AUTH, json={"text": "hi", "max_new_tokens": 4})
    assert response.status_code == 500
    assert response.json()["detail"].startswith("generation failed")
    assert "Traceback" not in response.text and "device-side" not in response.text
    after = client.post("/api/v1/generate-text", headers=AUTH, json={"text": "hi", "max_new_tokens": 4})
    assert after.status_code == 200


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_page_and_docs_are_served_beside_the_api(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/docs").status_code == 200
    assert "/api/v1/chat" in client.get("/openapi.json").json()["paths"]
