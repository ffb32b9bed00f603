"""Auth everywhere: every /api/* and /v1/* route of the app refuses a missing, wrong or wrongly presented
key and accepts a right one; keys never reach the logs or an error body."""

from __future__ import annotations

import base64
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount

from app import resolve_api_keys
from tests.helpers import API_KEY, AUTH, ForcedFault, start_server
from webapp.server import create_app
from webapp.settings import Settings

PROTECTED_PREFIXES = ("/api/", "/v1/")
WRONG_KEY = "sk-wrong-0123456789-abcdef"

# A small valid request for each protected route. A new route must be added here to be walked; the
# test fails until it is, so no route can be added without its auth being checked.
VALID_REQUESTS: dict[tuple[str, str], dict[str, Any] | None] = {
    ("POST", "/api/v1/generate-text"): {"text": "Halo", "max_new_tokens": 1},
    ("POST", "/api/v1/chat"): {"text": "Halo", "max_new_tokens": 1},
    ("POST", "/v1/chat/completions"): {"messages": [{"role": "user", "content": "Halo"}], "max_tokens": 1},
    ("GET", "/v1/models"): None,
    ("GET", "/v1/models/sahabat-ai"): None,
    ("POST", "/v1/completions"): {"prompt": "Halo", "max_tokens": 1},
    ("POST", "/v1/messages"): {
        "model": "sahabat-ai",
        "messages": [{"role": "user", "content": "Halo"}],
        "max_tokens": 1,
    },
    ("POST", "/v1/messages/count_tokens"): {"model": "sahabat-ai", "messages": [{"role": "user", "content": "Halo"}]},
    ("POST", "/v1/responses"): {"input": "Halo", "max_output_tokens": 1},
}
# The route each concrete path above is served by, where the route's path has a parameter.
ROUTE_OF = {"/v1/models/sahabat-ai": "/v1/models/{model_id:path}"}
# The catch-alls that answer unknown paths and methods under the API prefixes with a 404/405 in the API's error
# shape, and TRACE/QUERY/CONNECT on /health, /ready and /metrics with a 405 (webapp.errors.install_unmatched_routes;
# tests/test_openai_errors.py): they serve no data.
UNMATCHED_PATHS = {"/v1", "/api/v1", "/v1/{rest:path}", "/api/v1/{rest:path}"}

REFUSED_HEADERS: dict[str, dict[str, str]] = {
    "missing": {},
    "wrong key": {"Authorization": f"Bearer {WRONG_KEY}"},
    "right key, Basic scheme": {"Authorization": "Basic " + base64.b64encode(f"user:{API_KEY}".encode()).decode()},
    "right key, raw in Basic": {"Authorization": f"Basic {API_KEY}"},
    "right key, Token scheme": {"Authorization": f"Token {API_KEY}"},
    "right key, no scheme": {"Authorization": API_KEY},
    "empty Bearer": {"Authorization": "Bearer "},
    "Bearer only": {"Authorization": "Bearer"},
    "key prefix": {"Authorization": f"Bearer {API_KEY[:-1]}"},
    "key plus suffix": {"Authorization": f"Bearer {API_KEY}x"},
    "key in another header": {"Api-Key": API_KEY, "X-Auth-Token": API_KEY},
    "wrong x-api-key": {"x-api-key": WRONG_KEY},
    "empty x-api-key": {"x-api-key": ""},
    "x-api-key prefix": {"x-api-key": API_KEY[:-1]},
    "x-api-key as Bearer": {"x-api-key": f"Bearer {API_KEY}"},
    "wrong Bearer wins over x-api-key": {"Authorization": f"Bearer {WRONG_KEY}", "x-api-key": API_KEY},
    "key as a cookie": {"Cookie": f"api_key={API_KEY}; Authorization=Bearer%20{API_KEY}"},
}


def walk_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, full path) of every route, included routers and mounted apps (the Gradio page) included."""
    for context in iter_route_contexts(routes):
        route = context.original_route
        if isinstance(route, Mount):
            yield from walk_routes(list(getattr(route.app, "routes", [])), prefix + route.path)
            continue
        for method in sorted(context.methods or ()):
            if method != "HEAD":
                yield method, prefix + (context.path or "")


@pytest.fixture(scope="module")
def app(settings: Settings, engine) -> FastAPI:
    return create_app(settings, engine, [API_KEY, "second-key"])  # the Gradio page mounted, as served


@pytest.fixture(scope="module")
def http(app: FastAPI) -> TestClient:
    return TestClient(app)  # no lifespan: the session engine stays open


def test_the_walk_finds_every_api_route_and_only_reads_are_public(app: FastAPI) -> None:
    fallbacks = {
        (method, route.path)
        for route in app.router.routes
        if getattr(route, "name", "") == "unmatched_api_path"
        for method in route.methods
    }
    assert {p for _, p in fallbacks} == UNMATCHED_PATHS | {"/health", "/ready", "/metrics"}
    routes = set(walk_routes(app.routes)) - fallbacks  # the 404/405 answers: they serve no data
    protected = {(m, p) for m, p in routes if p.startswith(PROTECTED_PREFIXES) and p not in UNMATCHED_PATHS}
    walked = {(m, ROUTE_OF.get(p, p)) for m, p in VALID_REQUESTS}
    assert protected == walked, "add new /api or /v1 routes to VALID_REQUESTS"
    # Outside /api and /v1, the service's own routes (health, docs, ops) only read. Writes there are the
    # chat page's (Gradio, public unless GRADIO_AUTH is set; see the Security notes).
    service_routes = {(m, p) for m, p in routes if not p.startswith(PROTECTED_PREFIXES) and p not in UNMATCHED_PATHS}
    api_paths = {p for _, p in walk_routes([r for r in app.routes if not isinstance(r, Mount)])}
    writes = {(m, p) for m, p in service_routes if p in api_paths and m not in ("GET", "OPTIONS")}
    assert not writes, writes


@pytest.mark.parametrize(("method", "path"), list(VALID_REQUESTS))
@pytest.mark.parametrize("case", list(REFUSED_HEADERS))
def test_every_api_route_refuses_a_bad_key(http: TestClient, method: str, path: str, case: str) -> None:
    response = http.request(method, path, headers=REFUSED_HEADERS[case], json=VALID_REQUESTS[(method, path)])
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    message = body["error"]["message"] if path.startswith("/v1/") else body["detail"]
    assert "API key" in message
    if path.startswith("/v1/"):
        assert body["error"]["type"] == "authentication_error"
    assert API_KEY not in response.text and WRONG_KEY not in response.text
    assert API_KEY[:-1] not in response.text


@pytest.mark.parametrize(("method", "path"), list(VALID_REQUESTS))
@pytest.mark.parametrize("header", [f"Bearer {API_KEY}", f"bearer {API_KEY}", "Bearer second-key"])
def test_every_api_route_accepts_a_right_key(http: TestClient, method: str, path: str, header: str) -> None:
    response = http.request(method, path, headers={"Authorization": header}, json=VALID_REQUESTS[(method, path)])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "path"), list(VALID_REQUESTS))
@pytest.mark.parametrize("key", [API_KEY, "second-key"])
def test_every_api_route_accepts_a_right_x_api_key(http: TestClient, method: str, path: str, key: str) -> None:
    """Anthropic's clients send `x-api-key: <key>`: the same keys, on every route."""
    response = http.request(method, path, headers={"x-api-key": key}, json=VALID_REQUESTS[(method, path)])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("method", "path"), list(VALID_REQUESTS))
@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe not UTF-8"], ids=["malformed JSON", "not UTF-8"])
def test_a_keyless_request_is_refused_before_its_body_is_parsed(
    http: TestClient, method: str, path: str, body: bytes
) -> None:
    """401, not a 400 about the body: who may send a body is decided before anyone reads it (issue 28)."""
    response = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 401, response.text
    assert "missing API key" in response.text
    wrong = http.request(method, path, content=body, headers={"Content-Type": "application/json", "x-api-key": "no"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.text


@pytest.mark.parametrize("method", ["TRACE", "QUERY", "CONNECT"])
@pytest.mark.parametrize(
    ("path", "allow", "shape"),
    [
        ("/v1/chat/completions", "POST", "error"),
        ("/api/v1/chat", "POST", "detail"),
        ("/v1/messages", "POST", "type"),
        ("/health", "GET", "detail"),
        ("/metrics", "GET", "detail"),
    ],
)
def test_other_methods_are_405s_with_allow(http: TestClient, method: str, path: str, allow: str, shape: str) -> None:
    """TRACE and QUERY reached the page's mount (Gradio's 404) before issue 28; now a 405 in the API's shape."""
    response = http.request(method, path, headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == allow, response.text
    assert shape in response.json()


def test_an_unknown_api_path_is_not_an_open_door(http: TestClient) -> None:
    for path in ("/api/v1/unknown", "/v1/completions", "/v1/embeddings", "/api/v2/chat"):
        response = http.post(path, json={"text": "hi"})
        assert response.status_code in (401, 404, 405), (path, response.status_code)
        assert response.status_code != 200


def test_keys_never_reach_logs_or_error_bodies(http: TestClient, engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    for (method, path), body in VALID_REQUESTS.items():
        for headers in [*REFUSED_HEADERS.values(), AUTH]:
            bodies.append(http.request(method, path, headers=headers, json=body).text)
    # Errors after auth: invalid input, a generation fault (logged with its traceback), a bad JSON body.
    bodies.append(http.post("/api/v1/chat", headers=AUTH, json={"text": ""}).text)
    bodies.append(http.post("/api/v1/chat", headers={**AUTH, "Content-Type": "application/json"}, content=b"{").text)

    with ForcedFault(engine):
        bodies.append(http.post("/api/v1/generate-text", headers=AUTH, json={"text": "hi", "max_new_tokens": 1}).text)

    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.levelno >= logging.ERROR for r in server_records), "the forced fault was not logged"
    logged = "\n".join(caplog.text.splitlines() + [str(r.args) for r in server_records])
    for secret in (API_KEY, "second-key", WRONG_KEY):
        assert secret not in logged
        assert not any(secret in text for text in bodies)


def test_settings_never_show_secrets() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, api_keys=f"{API_KEY},other", hf_token="hf_secret_token", gradio_auth="admin:pa55word"
    )
    shown = repr(settings) + str(settings) + str(settings.model_dump())
    for secret in (API_KEY, "hf_secret_token", "pa55word"):
        assert secret not in shown
    with pytest.raises(Exception) as raised:
        Settings(_env_file=None, gradio_auth="admin-without-password-pa55word")  # type: ignore[call-arg]
    assert "pa55word" not in str(raised.value)


def test_gradio_auth_puts_the_chat_page_behind_a_login(engine) -> None:
    settings = Settings(model_id="embedded", _env_file=None, gradio_auth="admin:pa55word, tamu:rahasia")  # type: ignore[call-arg]
    http = TestClient(create_app(settings, engine, [API_KEY]))
    # Without a login the page's API (config, queue, the chat function) is closed; the login form is not.
    for path in ("/config", "/gradio_api/info"):
        assert http.get(path).status_code == 401
    assert http.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"}).status_code == 401
    assert http.post("/login", data={"username": "admin", "password": "wrong"}).status_code == 400
    assert http.post("/login", data={"username": "tamu", "password": "rahasia"}).status_code == 200
    assert http.get("/config").status_code == 200
    # The page's login is not an API key: the API still wants its Bearer key.
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers=AUTH).status_code == 200


def test_without_gradio_auth_the_chat_page_is_open(http: TestClient) -> None:
    """Documented in the Security notes: the page (and its programmatic API) answers anyone."""
    assert http.get("/config").status_code == 200


def test_api_keys_file_takes_one_key_per_line_and_skips_comments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine
) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(
        "# keys of the team\nsk-file-one\n\n    # an indented comment\n  sk-file-two  \n#sk-retired-key\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("API_KEYS", "sk-from-env")
    monkeypatch.setenv("API_KEYS_FILE", str(keys_file))
    settings = Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]
    keys = resolve_api_keys(settings)  # what app.py serves with
    assert keys == ["sk-from-env", "sk-file-one", "sk-file-two"]
    http = TestClient(create_app(settings, engine, keys, with_ui=False))
    for key in keys:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
    for not_a_key in ("# keys of the team", "#sk-retired-key", "sk-retired-key", "# an indented comment"):
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {not_a_key}"}).status_code == 401, not_a_key


GENERATED_KEY = re.compile(r"No API_KEYS configured; generated an API key for this run: (sk-[A-Za-z0-9_-]+)")


def test_without_keys_one_is_generated_printed_once_and_never_logged(settings: Settings, embedded_model) -> None:
    """A real `python app.py` with neither API_KEYS nor API_KEYS_FILE, logging at debug level."""
    served = start_server(settings, API_KEYS=None, API_KEYS_FILE=None, LOG_LEVEL="debug")
    try:
        printed = GENERATED_KEY.findall(served.log())
        assert len(printed) == 1, served.log()[-3000:]
        key = printed[0]
        assert len(key) >= 32  # "sk-" + 24 random bytes in base64
        bearer = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{served.url}/v1/models", headers=bearer, timeout=30).status_code == 200
        assert httpx.get(f"{served.url}/v1/models", headers=AUTH, timeout=30).status_code == 401
        answer = httpx.post(
            f"{served.url}/api/v1/chat", headers=bearer, json={"text": "Halo", "max_new_tokens": 2}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(120) == 0
        log = served.log()
        assert "shutdown requested" in log and " DEBUG " in log  # the debug log was on, and all of it is here
        assert log.count(key) == 1, "the generated key appears in the output beyond the one printed line"
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(10)
