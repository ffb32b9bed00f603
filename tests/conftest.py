"""Shared fixtures: the embedded model is loaded once per test session and shared by every engine.

Every fixture used by more than one test module is here, and only here (tests/test_tests_layout.py checks that no
fixture is defined twice); plain helpers and constants are in tests/helpers.py."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anthropic
import openai
import pytest
from fastapi.testclient import TestClient

from bench.gemma_shape import TINY_SHAPE, gemma2_config, write_model_dir
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel
from tests.helpers import (
    API_KEY,
    CHROMIUM,
    CHROMIUM_ARGS,
    LiveServer,
    engine_for,
    on_a_loader_thread,
    openai_client,
    start_live_server,
)
from webapp.server import create_app
from webapp.settings import Settings

if TYPE_CHECKING:
    from playwright.sync_api import Browser


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class _Memo(dict):
    """A dict that builds a missing value with `build(key)` (and keeps it)."""

    def __init__(self, build: Callable[[str], object]) -> None:
        super().__init__()
        self._build = build

    def __missing__(self, key: str) -> object:
        self[key] = value = self._build(key)
        return value


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def embedded_model(settings: Settings) -> LoadedModel:
    return on_a_loader_thread(settings)


@pytest.fixture(scope="module")
def engine_kind(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "batched")


@pytest.fixture(scope="session")
def shared_engines(settings: Settings, embedded_model: LoadedModel) -> Iterator[dict[str, LocalEngine]]:
    """One engine per kind for the whole session, built when first asked for."""
    engines = _Memo(lambda kind: engine_for(settings, embedded_model, kind))
    yield engines
    for built in engines.values():
        built.close()


@pytest.fixture(scope="module")
def engine(shared_engines: dict[str, LocalEngine], engine_kind: str) -> LocalEngine:
    return shared_engines[engine_kind]


@pytest.fixture(scope="session")
def shared_clients(settings: Settings, shared_engines: dict[str, LocalEngine]) -> Iterator[dict[str, TestClient]]:
    """One app per engine kind for the session (its lifespan closes the engine at the end)."""
    with contextlib.ExitStack() as stack:
        yield _Memo(
            lambda kind: stack.enter_context(
                TestClient(create_app(settings, shared_engines[kind], [API_KEY, "second-key"]))
            )
        )


@pytest.fixture(scope="module")
def client(shared_clients: dict[str, TestClient], engine_kind: str) -> TestClient:
    return shared_clients[engine_kind]


@pytest.fixture(scope="session")
def shared_live_servers(settings: Settings, embedded_model: LoadedModel) -> Iterator[dict[str, LiveServer]]:
    """Real servers, one per engine kind, each with its own engine instance (sharing the loaded model)."""
    servers = _Memo(lambda kind: start_live_server(settings, engine_for(settings, embedded_model, kind)))
    yield servers
    for live in servers.values():
        live.server.should_exit = True


@pytest.fixture(scope="module")
def live_server(shared_live_servers: dict[str, LiveServer], engine_kind: str) -> LiveServer:
    """A real server over the wire, on the module's engine kind."""
    return shared_live_servers[engine_kind]


@pytest.fixture(scope="module")
def oai(live_server: LiveServer) -> openai.OpenAI:
    """The official openai client on the module's live server."""
    return openai_client(live_server)


@pytest.fixture(scope="module")
def anthropic_client(live_server: LiveServer) -> anthropic.Anthropic:
    """The official anthropic client on the module's live server (`x-api-key`, the test key, no retries)."""
    return anthropic.Anthropic(base_url=live_server.base_url, api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model32(embedded_model: LoadedModel) -> LoadedModel:
    """The embedded model in float32, a copy of the loaded one: batched greedy rows equal lone ones whatever the
    batch holds (in bf16 they round differently; see tests/test_batching.py)."""
    import torch

    model = copy.deepcopy(embedded_model.model).to(torch.float32).eval()
    return LoadedModel(model, embedded_model.tokenizer, dataclasses.replace(embedded_model.info, dtype="float32"))


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma2 saved in a directory of the module's own. Its lm_head is untied (a plain linear in every
    quantization mode), so one output row can be changed without touching the input embeddings."""
    config = gemma2_config(TINY_SHAPE, tie_word_embeddings=False)
    return write_model_dir(tmp_path_factory.mktemp("tiny-gemma2"), config, seed=1234)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (a module using it calls helpers.skip_without_chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()
