"""Shared fixtures: the embedded model is loaded once per test session and shared by every engine."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from bench.loadgen import free_port
from inference import BatchedEngine, Engine, SequentialEngine
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel, load_model
from webapp.server import create_app
from webapp.settings import Settings

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
    # Loaded on a throw-away thread: a thread that ran torch's parallel kernels keeps an OpenMP team alive, and
    # two live teams on the 2-core CPU make every engine thread's forward passes slower (see LocalEngine.load).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(load_model, settings).result()


ENGINE_KINDS = ("batched", "sequential")
# `pytestmark = both_engines` runs a module's tests on each engine behind the shared fixtures (engine, client,
# live_server); without it they run on the engine users get, the default ENGINE=batched. Grouped by module, so each
# module runs all its tests on one engine, then on the other.
both_engines = pytest.mark.parametrize("engine_kind", ENGINE_KINDS, indirect=True, scope="module")


def engine_for(settings: Settings, loaded: LoadedModel, kind: str = "batched") -> LocalEngine:
    """A loaded engine of `kind` over an already loaded model (the default: the engine users get)."""
    engine_class = {"batched": BatchedEngine, "sequential": SequentialEngine}[kind]
    engine = engine_class(settings, loader=lambda _settings: loaded)
    engine.load()
    return engine


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


@dataclass
class LiveServer:
    base_url: str
    engine: Engine
    server: uvicorn.Server


def start_live_server(
    settings: Settings,
    engine,
    api_keys: list[str] | None = None,
    port: int | None = None,
    send_buffer_bytes: int | None = None,
) -> LiveServer:
    """A real uvicorn server on a loopback port (a free one unless given), in a thread.

    `send_buffer_bytes` fixes the kernel's send buffer of its connections (Linux otherwise grows it up to 4 MB on
    loopback, more than any reply here), so that a test can make the server wait on a slow reader."""
    port = port or free_port()
    app = create_app(settings, engine, api_keys or [API_KEY])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    sockets = None
    if send_buffer_bytes is not None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)  # accepted sockets inherit it
        listener.bind(("127.0.0.1", port))
        sockets = [listener]
    threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True).start()
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


class ForcedFault:
    """Makes an engine's own forward pass raise, as a CUDA fault would: for requests whose prompt carries `marker`
    (every request when None), before their first token, or once they have generated `after` tokens.

    A fake only to force a fault the real model cannot produce on demand. It sits where each engine runs the model:
    the sequential engine's `model.generate`, the batched engine's forward pass (the lean decoder's, which carries
    the running rows and the newcomers' prompts together). Use it as a context manager.
    """

    def __init__(self, engine: Engine, marker: str | None = None, after: int = 0) -> None:
        self.engine, self.marker, self.after = engine, marker, after
        self._patch = pytest.MonkeyPatch()

    def _carries(self, text: str) -> bool:
        return self.marker is None or self.marker in text

    def __enter__(self) -> ForcedFault:
        engine = self.engine
        if isinstance(engine, SequentialEngine):
            self._patch.setattr(engine.model, "generate", self._faulty_generate(engine.model.generate))
        else:
            assert isinstance(engine, BatchedEngine) and engine.decoder is not None, "the lean decoder's pass"
            self._patch.setattr(engine.decoder, "forward", self._faulty_pass(engine.decoder.forward))
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.undo()

    def _faulty_generate(self, original: Callable[..., object]) -> Callable[..., object]:
        def generate(*args: object, **kwargs: object) -> object:
            if self._carries(self.engine.tokenizer.decode(kwargs["input_ids"][0])):  # type: ignore[index]
                if not self.after:
                    raise RuntimeError("CUDA error: device-side assert triggered (forced by test)")
                steps = 0

                def bomb(*_args: object, **_kwargs: object) -> bool:
                    nonlocal steps
                    steps += 1
                    if steps > self.after:
                        raise RuntimeError("CUDA error: an illegal memory access was encountered (forced by test)")
                    return False

                kwargs["stopping_criteria"].append(bomb)  # type: ignore[attr-defined]
            return original(*args, **kwargs)

        return generate

    def _faulty_pass(self, original: Callable[..., object]) -> Callable[..., object]:
        def forward(decode: object, prompts: list) -> object:
            engine = self.engine
            if not self.after and any(self._carries(engine.tokenizer.decode(p.ids[p.start :])) for p in prompts):
                raise RuntimeError("CUDA error: device-side assert triggered (forced by test)")
            if self.after and decode is not None:
                for slot in engine.runner.batch.slots:  # the decoding rows of this pass, in order
                    text = "".join(message.content for message in slot.request.messages)
                    if self._carries(text) and slot.generated >= self.after:
                        raise RuntimeError("CUDA error: an illegal memory access was encountered (forced by test)")
            return original(decode, prompts)

        return forward
