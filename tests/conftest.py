"""Shared fixtures: the embedded model is loaded once per test session and shared by every engine."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from inference import SequentialEngine
from inference.loading import LoadedModel, load_model
from inference.settings import Settings
from webapp.server import create_app

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def sse_events_from_lines(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from SSE lines, parsed the way `curl -N` users read them (lazily, so a test can
    stop reading mid-stream). A last event without its blank line still counts."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event, "\n".join(data)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def embedded_model(settings: Settings) -> LoadedModel:
    # Loaded on a throw-away thread: a thread that ran torch's parallel kernels keeps an OpenMP team alive, and
    # two live teams on the 2-core CPU make every engine thread's forward passes slower (see LocalEngine.load).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(load_model, settings).result()


def engine_for(settings: Settings, loaded: LoadedModel) -> SequentialEngine:
    engine = SequentialEngine(settings, loader=lambda _settings: loaded)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def engine(settings: Settings, embedded_model: LoadedModel) -> SequentialEngine:
    return engine_for(settings, embedded_model)


@pytest.fixture(scope="session")
def client(settings: Settings, engine: SequentialEngine) -> Iterator[TestClient]:
    """One app for the session (its lifespan closes the engine at the end)."""
    app = create_app(settings, engine, [API_KEY, "second-key"])
    with TestClient(app) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    engine: SequentialEngine
    server: uvicorn.Server


def start_live_server(
    settings: Settings, engine, api_keys: list[str] | None = None, port: int | None = None
) -> LiveServer:
    """A real uvicorn server on a loopback port (a free one unless given), in a thread."""
    port = port or free_port()
    app = create_app(settings, engine, api_keys or [API_KEY])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return LiveServer(base_url, engine, server)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("live server did not start")


@pytest.fixture(scope="session")
def live_server(settings: Settings, embedded_model: LoadedModel) -> Iterator[LiveServer]:
    """A real server with its own engine instance (sharing the loaded model) for over-the-wire tests."""
    live = start_live_server(settings, engine_for(settings, embedded_model))
    yield live
    live.server.should_exit = True
