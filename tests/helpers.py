"""Plain helpers and constants shared by the tests: test modules import them from here, never from one another
(the shared fixtures are in tests/conftest.py; tests/test_tests_layout.py keeps it that way)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bench.loadgen import free_port  # also for the tests: a free loopback port
from inference import BatchedEngine, Engine, SequentialEngine
from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel, load_model
from inference.types import GenerationRequest, GenerationResult, Message, StreamEvent, TextDelta
from webapp.server import create_app
from webapp.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


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


def on_a_loader_thread(settings: Settings) -> LoadedModel:
    """`load_model` on a throw-away thread: a thread that ran torch's parallel kernels keeps an OpenMP team alive, and
    two live teams on the 2-core CPU make every engine thread's forward passes slower (see LocalEngine.load)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(load_model, settings).result()


def model_settings(directory: Path, **values: object) -> Settings:
    """Settings that load the model saved in `directory` (no .env file read)."""
    return Settings(model_id=str(directory), _env_file=None, **values)  # type: ignore[arg-type]


def chat_request(*messages: tuple[str, str], max_new_tokens: int = 8) -> GenerationRequest:
    """A greedy request of `(role, content)` messages."""
    return GenerationRequest(
        messages=tuple(Message(role, content) for role, content in messages),  # type: ignore[arg-type]
        max_new_tokens=max_new_tokens,
        temperature=0,
    )


async def collect(stream: AsyncIterator[StreamEvent]) -> tuple[list[str], GenerationResult]:
    """An engine stream read to its end: the text of its deltas and its result."""
    deltas: list[str] = []
    async for event in stream:
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            assert isinstance(event, GenerationResult)
            return deltas, event
    raise AssertionError("the stream ended without a result")


async def result_of(stream: AsyncIterator[StreamEvent]) -> GenerationResult:
    """An engine stream read to its end, its deltas skipped: its result."""
    async for event in stream:
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("the stream ended without a result")


# ---- a real server over the wire ----


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


def openai_client(live: LiveServer, timeout: float = 600) -> openai.OpenAI:
    """The official client on a live server's /v1, with the test key and no retries."""
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=timeout)


# ---- server-sent events ----


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


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a streamed response, parsed the way `curl -N` users read them."""
    yield from sse_events_from_lines(response.iter_lines())


def spec_stream_events(
    target: LiveServer | TestClient, path: str, body: dict, timeout: float = 600
) -> tuple[list[str], list[tuple[str, str]], httpx.Response]:
    """POST a streaming `body` to a spec route (of a live server, or of an app through its TestClient), which must
    answer 200: the text of its `delta` events, every other (event, data) pair in order, and the response."""
    if isinstance(target, TestClient):
        opened = target.stream("POST", path, headers=AUTH, json=body)
    else:
        opened = httpx.stream("POST", f"{target.base_url}{path}", headers=AUTH, json=body, timeout=timeout)
    deltas: list[str] = []
    others: list[tuple[str, str]] = []
    with opened as response:
        assert response.status_code == 200, response.read()
        for event, data in sse_events(response):
            if event == "delta":
                deltas.append(json.loads(data)["delta"])
            else:
                others.append((event, data))
    return deltas, others, response


def spec_stream(target: LiveServer | TestClient, path: str, body: dict) -> tuple[list[str], dict, httpx.Response]:
    """A streamed spec call that succeeds: the text of its deltas, its `complete` object, the response. Any other
    event fails the test."""
    deltas, others, response = spec_stream_events(target, path, body)
    final: dict = {}
    for event, data in others:
        if event != "complete":
            pytest.fail(f"unexpected event {event}: {data}")
        final = json.loads(data)
    return deltas, final, response


# ---- `python app.py` in a process of its own ----

APP_KEY = "sk-shutdown-test-9d2e41"
APP_AUTH = {"Authorization": f"Bearer {APP_KEY}"}
LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str = ""
    output: list[str] = field(default_factory=list)

    def log(self) -> str:
        return "".join(self.output)


def start_server(settings: Settings, address_space: int | None = None, **env: str | None) -> Served:
    """`python app.py` on a free port, ready; `env` adds variables (None removes one); `address_space`: its RLIMIT_AS
    (`ulimit -v`) in bytes."""
    environment: dict[str, str | None] = {
        **os.environ,
        "MODEL_ID": "embedded",
        "MODEL_CACHE_DIR": str(settings.model_cache_dir),  # warmed by the session's model load
        "HOST": "127.0.0.1",
        "PORT": "0",  # any free port: the test reads it from the log (no race with other processes)
        "API_KEYS": APP_KEY,
        "METRICS_PUBLIC": "true",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "app.py"],
        cwd=ROOT,
        env={name: value for name, value in environment.items() if value is not None},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=None if address_space is None else lambda: limit_address_space(address_space),
    )
    served = Served(process)
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: served.output.extend(iter(stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{served.log()}")
        if not served.url:
            found = LISTENING.search(served.log())
            served.url = found.group(1) if found else ""
        try:
            if served.url and httpx.get(f"{served.url}/ready", timeout=2).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"app.py was not ready in time:\n{served.log()}")


def limit_address_space(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def process_status(pid: int) -> dict[str, int]:
    """VmSize, VmRSS, VmHWM and RssAnon of process `pid`, in bytes (Linux)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmSize", "VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0]) * 1024
    return values


# ---- schemathesis runs (tests/test_fuzz.py, tests/test_fuzz_openapi.py) ----


@dataclass
class FuzzRecord:
    """What a schemathesis run saw: responses by (operation, status), the first failure of each (operation, check,
    title) described, and the engine's errors."""

    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[tuple[str, str, str], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, event: Any) -> None:
        from schemathesis.engine import Status, events

        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    self.statuses[(event.label or "", interaction.response.status_code)] += 1
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.status == Status.FAILURE:
                        title = check.failure_info.failure.title if check.failure_info else ""
                        key3 = (event.label or "", check.name, title)
                        self.failures.setdefault(key3, describe_check(check, event.recorder.interactions.get(case_id)))
        elif isinstance(event, events.NonFatalError):
            self.errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            self.errors.append(f"fatal: {event.exception!r}")


def describe_check(check: Any, interaction: Any) -> str:
    """A failed schemathesis check, its reproduction and the response, for an assertion message."""
    info = check.failure_info
    text = f"- {check.name}: {info.failure.title if info else ''}\n  {info.failure.message[:600] if info else ''}\n"
    if info is not None:
        text += f"  {info.code_sample[:1200]}\n"
    if interaction is not None and interaction.response is not None:
        text += f"  -> {interaction.response.status_code} {interaction.response.content[:300]!r}\n"
    return text


# ---- Debian's Chromium, headless, driven by Playwright ----

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000  # generous: CI machines are small and shared


def skip_without_chromium() -> None:
    """At a browser test module's top: skip the module where Chromium is missing (in CI, fail instead)."""
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)"
        if os.environ.get("CI"):
            raise RuntimeError(message)  # in CI the browser tests must run, not be skipped
        pytest.skip(message, allow_module_level=True)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


# ---- a forced engine fault ----


class ForcedFault:
    """Makes an engine's own forward pass raise, as a CUDA fault would: for requests whose prompt carries `marker`
    (every request when None), before their first token, or once they have generated `after` tokens.

    A fake only to force a fault the real model cannot produce on demand. It sits where each engine runs the model:
    the sequential engine's `model.generate`, the batched engine's pass: the lean decoder's, which carries the running
    rows and the newcomers' prompts together, or transformers' forward (FAST_DECODE=false, Gemma2, bitsandbytes), a
    prefill or a decoding step. A decoding pass fails when a row of that pass (the runner's batch) carries `marker`.
    Use it as a context manager.
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
            assert isinstance(engine, BatchedEngine)
            if engine.lean_pass is not None:
                self._patch.setattr(engine.lean_pass, "forward", self._faulty_pass(engine.lean_pass.forward))
            else:
                self._patch.setattr(engine.model, "forward", self._faulty_forward(engine.model.forward))
        return self

    def _decoding_row_fails(self) -> bool:
        assert isinstance(self.engine, BatchedEngine)
        for slot in self.engine.runner.batch.slots:  # the decoding rows of this pass, in order
            text = slot.request.prompt or "".join(message.content for message in slot.request.messages)
            if self._carries(text) and slot.generated >= self.after:
                return True
        return False

    def _faulty_forward(self, original: Callable[..., object]) -> Callable[..., object]:
        def forward(*args: object, **kwargs: Any) -> object:
            prefill = kwargs.get("logits_to_keep") == 1  # the runner's prefill asks for the last logits only
            rows = kwargs["input_ids"]
            if prefill and not self.after and any(self._carries(self.engine.tokenizer.decode(row)) for row in rows):
                raise RuntimeError("CUDA error: device-side assert triggered (forced by test)")
            if not prefill and self.after and self._decoding_row_fails():
                raise RuntimeError("CUDA error: an illegal memory access was encountered (forced by test)")
            return original(*args, **kwargs)

        return forward

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
            if self.after and decode is not None and self._decoding_row_fails():
                raise RuntimeError("CUDA error: an illegal memory access was encountered (forced by test)")
            return original(decode, prompts)

        return forward


# A function tool in the neutral shape (name, description, parameters), wrapped per protocol by the tool tests.
ADD_FUNCTION = {
    "name": "add",
    "description": "Add two whole numbers",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}
