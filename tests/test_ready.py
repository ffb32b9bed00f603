"""`/ready` before, during and after the model load; the API answers 503 + Retry-After meanwhile."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from inference import SequentialEngine
from inference.model.loading import LoadedModel
from inference.types import ModelLoadError
from tests.helpers import API_KEY, AUTH
from webapp.server import create_app
from webapp.settings import Settings


def wait_until_ready(client: TestClient, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get("/ready")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s} s: {response.json()}")


def test_ready_is_503_while_loading_then_200(settings: Settings, embedded_model: LoadedModel) -> None:
    release = threading.Event()

    def slow_loader(_settings: Settings) -> LoadedModel:
        assert release.wait(30)
        return embedded_model

    engine = SequentialEngine(settings, loader=slow_loader)
    failures: list[BaseException] = []
    app = create_app(settings, engine, [API_KEY], on_load_failed=failures.append, with_ui=False)
    with TestClient(app) as client:
        # The server answers while the model loads.
        assert client.get("/health").json() == {"status": "ok"}
        loading = client.get("/ready")
        assert loading.status_code == 503
        assert loading.json() == {"status": "loading", "reason": "model is loading", "model": None}
        assert int(loading.headers["Retry-After"]) > 0
        api = client.post("/api/v1/chat", headers=AUTH, json={"text": "Halo", "max_new_tokens": 2})
        assert api.status_code == 503 and int(api.headers["Retry-After"]) > 0
        assert "loading" in api.json()["detail"]

        release.set()
        assert wait_until_ready(client) == {"status": "ready", "reason": "ready", "model": "SmolLM2-135M-Instruct-Q4_1"}
        assert client.post("/api/v1/chat", headers=AUTH, json={"text": "Halo", "max_new_tokens": 2}).status_code == 200
    assert not failures
    assert engine.state == "stopping"  # the lifespan closed it


def test_ready_reports_a_failed_load(settings: Settings) -> None:
    def broken_loader(_settings: Settings) -> LoadedModel:
        raise ModelLoadError("could not load model 'nope': no such directory")

    engine = SequentialEngine(settings, loader=broken_loader)
    failures: list[BaseException] = []
    app = create_app(settings, engine, [API_KEY], on_load_failed=failures.append, with_ui=False)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        response = client.get("/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "failed" and "no such directory" in body["reason"]
        assert "Retry-After" not in response.headers  # retrying does not help; the process exits


def test_ready_on_the_loaded_service(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200 and response.json()["status"] == "ready"
