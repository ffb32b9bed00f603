"""Shared fixtures: the embedded model is loaded once per test session and shared by every engine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from inference import SequentialEngine
from inference.loading import LoadedModel, load_model
from inference.settings import Settings
from webapp.server import create_app

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def embedded_model(settings: Settings) -> LoadedModel:
    return load_model(settings)


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
