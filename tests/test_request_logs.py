"""Request ids and the one log line per request: fields present, never a key, no prompt by default."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from inference import GenerationRequest, GenerationResult
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, AUTH, ForcedFault, engine_for
from webapp.middleware.observability import JsonFormatter, TextFormatter
from webapp.server import create_app
from webapp.settings import Settings

CLIENT_LOGGERS = ("httpx", "httpcore")
PROMPT = "Sopo wae sing ana ing Punakawan? rahasia-prompt-7f3a"


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "webapp.access"]


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record the server side wrote, as both formatters would write it (the test client's own
    httpx logger, which prints the URL it calls, is not the server's)."""
    text, json_ = TextFormatter(), JsonFormatter()
    server = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    return "\n".join(f"{text.format(r)}\n{json_.format(r)}" for r in server)


def test_request_id_round_trip(client: TestClient) -> None:
    given = client.get("/health", headers={"X-Request-ID": "trace-42.a:b_c"})
    assert given.headers["X-Request-ID"] == "trace-42.a:b_c"
    made = client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    assert client.get("/health").headers["X-Request-ID"] != made.headers["X-Request-ID"]
    for insane in (b"has spaces", b"x" * 200, "caf\u00e9".encode(), b"-leading-dash", b"a/b", b"<script>"):
        replaced = client.get("/health", headers={"X-Request-ID": insane})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["X-Request-ID"]), insane
    # Error responses carry it too.
    assert client.post("/api/v1/chat", headers={"X-Request-ID": "denied-1"}, json={}).headers["X-Request-ID"] == (
        "denied-1"
    )


SHORT = {"max_new_tokens": 3, "temperature": 0}
SHORT_OPENAI = {"max_tokens": 3, "temperature": 0}


def body_for(path: str, text: str) -> dict:
    """A short request for the documented chat route or the OpenAI-compatible one."""
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": text}], **SHORT_OPENAI}
    return {"text": text, **SHORT}


API_PATHS = ("/api/v1/chat", "/v1/chat/completions")


@pytest.mark.parametrize("path", API_PATHS)
def test_the_request_id_reaches_the_engine(client: TestClient, engine: LocalEngine, path: str) -> None:
    seen: list[str] = []

    def listener(request: GenerationRequest, result: GenerationResult) -> None:
        seen.append(request.request_id)

    engine.add_result_listener(listener)
    try:
        response = client.post(path, headers={**AUTH, "X-Request-ID": "engine-sees-me"}, json=body_for(path, "Hai"))
    finally:
        engine.remove_result_listener(listener)
    assert response.status_code == 200
    assert seen == ["engine-sees-me"]


FAULT = "GAGAL-DENGAN-ID"


@pytest.mark.parametrize("kind", ["batched", "sequential"])
@pytest.mark.parametrize("path", API_PATHS)
def test_a_failed_generation_is_logged_with_its_request_id(
    shared_clients: dict[str, TestClient],
    shared_engines: dict[str, LocalEngine],
    caplog: pytest.LogCaptureFixture,
    path: str,
    kind: str,
) -> None:
    """The operator finds a failed generation's traceback by the id the client saw (`X-Request-ID`), on every API
    family and both local engines (a failing prompt fails alone on the batched engine too: its pass is rerun
    without it, so the log names that one request)."""
    client, engine = shared_clients[kind], shared_engines[kind]
    request_id = f"failed-{path.strip('/').replace('/', '-')}"
    with caplog.at_level(logging.ERROR), ForcedFault(engine, FAULT):
        response = client.post(path, headers={**AUTH, "X-Request-ID": request_id}, json=body_for(path, FAULT))
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == request_id
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation failed (request")]
    assert failures == [f"generation failed (request {request_id})"]


def test_one_line_per_request_with_tokens_and_timings(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        response = client.post(
            "/api/v1/generate-text?api_key=in-query-string",
            headers={**AUTH, "X-Request-ID": "line-1"},
            json={"text": PROMPT, **SHORT},
        )
    assert response.status_code == 200
    body = response.json()
    lines = [r for r in access_records(caplog) if r.fields["request_id"] == "line-1"]  # type: ignore[attr-defined]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert lines[0].levelno == logging.INFO
    assert fields["method"] == "POST"
    assert fields["path"] == "/api/v1/generate-text"  # no query string
    assert fields["route"] == "/api/v1/generate-text"
    assert fields["status"] == 200
    assert fields["prompt_tokens"] == body["input_length"]
    assert fields["generated_tokens"] == body["output_length"]
    assert fields["ttft_ms"] > 0 and fields["duration_ms"] >= fields["ttft_ms"]
    assert "prompt" not in fields
    text = all_log_text(caplog)
    assert "rahasia-prompt-7f3a" not in text
    assert "in-query-string" not in text


def test_keys_are_never_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "sk-wrong-key-5b1c9e"
    with caplog.at_level(logging.DEBUG):
        assert client.post("/api/v1/chat", headers=AUTH, json={"text": "Halo", **SHORT}).status_code == 200
        assert client.get("/metrics", headers=AUTH).status_code == 200
        assert client.post("/api/v1/chat", headers={"Authorization": f"Bearer {wrong}"}, json={}).status_code == 401
        assert client.post("/api/v1/chat", headers=AUTH, json={"text": "x", "max_new_tokens": 0}).status_code == 400
    assert len(access_records(caplog)) >= 4
    text = all_log_text(caplog)
    assert API_KEY not in text and wrong not in text
    assert "Bearer" not in text


@pytest.fixture
def prompt_logging_client(settings: Settings, embedded_model: LoadedModel) -> Iterator[TestClient]:
    logged = settings.model_copy(update={"log_prompts": True})
    app = create_app(logged, engine_for(logged, embedded_model), [API_KEY], with_ui=False)
    with TestClient(app) as client:
        yield client


def test_log_prompts_puts_the_prompt_in_the_line(
    prompt_logging_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        prompt_logging_client.post(
            "/api/v1/chat", headers={**AUTH, "X-Request-ID": "p-1"}, json={"text": PROMPT, **SHORT}
        )
    (line,) = [r for r in access_records(caplog) if r.fields["request_id"] == "p-1"]  # type: ignore[attr-defined]
    assert line.fields["prompt"] == PROMPT  # type: ignore[attr-defined]
    assert API_KEY not in all_log_text(caplog)


def test_probes_log_at_debug(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        client.get("/ready", headers={"X-Request-ID": "probe-1"})
    (line,) = [r for r in access_records(caplog) if r.fields["request_id"] == "probe-1"]  # type: ignore[attr-defined]
    assert line.levelno == logging.DEBUG


def test_json_and_text_formats() -> None:
    record = logging.LogRecord("webapp.access", logging.INFO, __file__, 1, "%s %s %s", ("GET", "/x", 200), None)
    record.fields = {"request_id": "r1", "route": "/x", "status": 200, "prompt": 'say "hi" now'}
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "GET /x 200" and parsed["request_id"] == "r1" and parsed["status"] == 200
    assert parsed["level"] == "INFO" and parsed["logger"] == "webapp.access"
    line = TextFormatter().format(record)
    assert line.endswith('GET /x 200 request_id=r1 route=/x status=200 prompt="say \\"hi\\" now"')
