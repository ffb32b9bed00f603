"""CORS on /v1 and /api/v1 (CORS_ALLOW_ORIGINS): the headers of preflights and of actual responses, errors
included, with the Gradio page mounted as served. The real browser's view of it: tests/test_cors_browser.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from inference import BatchedEngine
from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, AUTH
from webapp.server import create_app
from webapp.settings import Settings

APP_ORIGIN = "https://chat.example"
OTHER_ORIGIN = "https://evil.example"
CHAT = {"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 2, "temperature": 0}
SPEC_CHAT = {"text": "Halo", "max_new_tokens": 2, "temperature": 0}


def settings_with(origins: str, **extra: object) -> Settings:
    return Settings(model_id="embedded", _env_file=None, cors_allow_origins=origins, **extra)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def clients(engine) -> Iterator[dict[str, TestClient]]:
    """One app per policy: the default (`*`), one listed origin, none. No lifespan: the session engine stays open."""
    yield {
        name: TestClient(create_app(settings_with(origins), engine, [API_KEY]))
        for name, origins in {"default": "*", "listed": APP_ORIGIN, "none": ""}.items()
    }


def preflight(
    client: TestClient,
    path: str,
    origin: str,
    method: str = "POST",
    request_headers: str = "authorization,content-type",
) -> dict[str, str]:
    response = client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": request_headers,
        },
    )
    return {"status": str(response.status_code), **{k.lower(): v for k, v in response.headers.items()}}


def test_the_default_is_every_origin_and_no_credentials() -> None:
    settings = Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]
    assert settings.cors_origins() == ["*"]


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/api/v1/chat", "/api/v1/generate-text", "/v1/models", "/v1/responses"]
)
def test_a_preflight_from_any_origin_is_allowed_by_default(clients: dict[str, TestClient], path: str) -> None:
    method = "GET" if path == "/v1/models" else "POST"
    headers = preflight(clients["default"], path, OTHER_ORIGIN, method)
    assert headers["status"] == "200"
    assert headers["access-control-allow-origin"] == "*"
    assert method in headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "access-control-allow-credentials" not in headers  # keys are headers, never cookies


def test_a_browser_anthropic_client_may_send_its_headers(clients: dict[str, TestClient]) -> None:
    """Anthropic's SDKs send the key as `x-api-key` with `anthropic-version` (and, in a browser,
    `anthropic-dangerous-direct-browser-access`)."""
    sent = "x-api-key,anthropic-version,anthropic-beta,anthropic-dangerous-direct-browser-access,content-type"
    headers = preflight(clients["default"], "/v1/messages", OTHER_ORIGIN, request_headers=sent)
    assert headers["status"] == "200"
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert set(sent.split(",")) <= allowed


def test_actual_responses_carry_the_headers_errors_included(clients: dict[str, TestClient]) -> None:
    client = clients["default"]
    origin = {"Origin": OTHER_ORIGIN}
    responses = {
        "models": client.get("/v1/models", headers={**AUTH, **origin}),
        "chat": client.post("/v1/chat/completions", headers={**AUTH, **origin}, json=CHAT),
        "spec": client.post("/api/v1/chat", headers={**AUTH, **origin}, json=SPEC_CHAT),
        "no key": client.post("/v1/chat/completions", headers=origin, json=CHAT),
        "bad body": client.post("/api/v1/chat", headers={**AUTH, **origin}, json={"text": ""}),
        "too large": client.post(
            "/v1/chat/completions",
            headers={**AUTH, **origin, "Content-Type": "application/json"},
            content=b" " * (client.app.state.settings.max_body_bytes + 1),  # type: ignore[attr-defined]
        ),
    }
    statuses = {name: response.status_code for name, response in responses.items()}
    assert statuses == {"models": 200, "chat": 200, "spec": 200, "no key": 401, "bad body": 400, "too large": 413}
    for name, response in responses.items():
        assert response.headers.get("access-control-allow-origin") == "*", name
        exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
        assert exposed == {"x-request-id", "retry-after"}, name
        assert "access-control-allow-credentials" not in response.headers, name


def test_a_503_with_retry_after_is_readable_cross_origin(settings: Settings, embedded_model: LoadedModel) -> None:
    loading = BatchedEngine(settings, loader=lambda _settings: embedded_model)  # never loaded: state "loading"
    client = TestClient(create_app(settings_with("*"), loading, [API_KEY]))
    response = client.post("/v1/chat/completions", headers={**AUTH, "Origin": OTHER_ORIGIN}, json=CHAT)
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert response.headers["access-control-allow-origin"] == "*"
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()
    loading.close()


def test_a_listed_origin_is_echoed_and_any_other_is_refused(clients: dict[str, TestClient]) -> None:
    client = clients["listed"]
    allowed = preflight(client, "/v1/chat/completions", APP_ORIGIN)
    assert allowed["status"] == "200"
    assert allowed["access-control-allow-origin"] == APP_ORIGIN
    assert "origin" in allowed["vary"].lower()
    refused = preflight(client, "/v1/chat/completions", OTHER_ORIGIN)
    assert refused["status"] == "400"
    assert "access-control-allow-origin" not in refused

    ok = client.get("/v1/models", headers={**AUTH, "Origin": APP_ORIGIN})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "origin" in ok.headers["vary"].lower()  # caches keep one answer per origin
    other = client.get("/v1/models", headers={**AUTH, "Origin": OTHER_ORIGIN})
    assert other.status_code == 200  # the server answers; the browser keeps the reply from the page
    assert "access-control-allow-origin" not in other.headers


def test_an_empty_setting_allows_no_origin(clients: dict[str, TestClient]) -> None:
    client = clients["none"]
    assert preflight(client, "/v1/chat/completions", APP_ORIGIN)["status"] == "400"
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={**AUTH, "Origin": APP_ORIGIN}).headers


def test_the_api_preflight_is_not_gradios_and_the_page_keeps_its_own(clients: dict[str, TestClient]) -> None:
    """The Gradio mount answers preflights for localhost origins (with credentials) on its own paths; on the API
    paths the answer is this service's policy alone, whatever the origin."""
    local = "http://localhost:3000"
    for client in clients.values():
        api = preflight(client, "/v1/chat/completions", local)
        assert "access-control-allow-credentials" not in api
        assert api.get("access-control-allow-origin") in (None, "*")
        page = preflight(client, "/gradio_api/queue/join", local)
        assert page["status"] == "200"
        assert page["access-control-allow-origin"] == local  # Gradio's own policy, unchanged
        assert client.get("/").status_code == 200
        # A method the API routes do not have falls through to the mount: still no Gradio CORS headers on it.
        stray = client.put("/v1/models", headers={**AUTH, "Origin": local})
        assert "access-control-allow-credentials" not in stray.headers
        assert stray.headers.get("access-control-allow-origin") in (None, "*")


def test_only_the_api_paths_get_the_headers(clients: dict[str, TestClient]) -> None:
    for path in ("/health", "/openapi.json"):
        response = clients["default"].get(path, headers={"Origin": OTHER_ORIGIN})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers, path


@pytest.mark.parametrize(
    "value", ["https://chat.example/", "https://chat.example/app", "chat.example", "*, https://chat.example"]
)
def test_a_malformed_origin_stops_start_up_naming_the_setting(value: str) -> None:
    with pytest.raises(ValueError, match="cors_allow_origins") as raised:
        settings_with(value)
    assert "origin" in str(raised.value)


def test_several_origins_are_read_from_one_comma_separated_value() -> None:
    origins = settings_with(" https://a.example , http://localhost:5173,,app://desktop ").cors_origins()
    assert origins == ["https://a.example", "http://localhost:5173", "app://desktop"]
