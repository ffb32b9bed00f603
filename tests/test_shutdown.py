"""SIGTERM on a real `python app.py` process: new work gets 503, the in-flight request completes, exit 0; the
shutdown timeout and a second signal end the wait for it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from inference.model.loading import LoadedModel
from tests.helpers import APP_AUTH, APP_KEY, Served, start_server
from webapp.settings import Settings

LONG_REQUEST = {
    "text": "Hitung dari 1 sampai 500, pisahkan dengan koma. / Count from 1 to 500, separated by commas.",
    "temperature": 0,
}
TARGET_GENERATION_S = 8.0  # long enough to signal and probe mid-generation, on a fast or a loaded machine
# A reply this long runs on for many seconds after its first tokens on any machine that serves this model; a
# process that waited for it would send its `complete` event, whatever the machine's speed.
LONG_REPLY_TOKENS = 2000


@pytest.fixture
def server(settings: Settings, embedded_model: LoadedModel) -> Iterator[Served]:
    served = start_server(settings, SHUTDOWN_TIMEOUT_S="600")
    yield served
    if served.process.poll() is None:
        served.process.kill()
        served.process.wait(10)


def tokens_for_a_long_request(url: str) -> int:
    """max_new_tokens that keeps this machine busy for about TARGET_GENERATION_S (measured, not guessed)."""
    started = time.monotonic()
    response = httpx.post(
        f"{url}/api/v1/generate-text", headers=APP_AUTH, json={**LONG_REQUEST, "max_new_tokens": 8}, timeout=120
    )
    assert response.status_code == 200, response.text
    per_token = (time.monotonic() - started) / max(1, response.json()["output_length"])
    return max(16, min(1000, int(TARGET_GENERATION_S / per_token)))


def engine_gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    line = next(line for line in text.splitlines() if line.startswith(f"sahabat_engine_{name} "))
    return float(line.split()[1])


def running_generations(url: str) -> float:
    return engine_gauge(url, "running_requests")


def test_sigterm_drains_the_in_flight_request_and_exits_0(server: Served) -> None:
    url = server.url
    outcome: dict[str, object] = {}
    max_new_tokens = tokens_for_a_long_request(url)

    def long_request() -> None:
        response = httpx.post(
            f"{url}/api/v1/generate-text",
            headers=APP_AUTH,
            json={**LONG_REQUEST, "max_new_tokens": max_new_tokens},
            timeout=600,
        )
        outcome["at"] = time.monotonic()
        outcome["status"] = response.status_code
        outcome["body"] = response.json()

    client = threading.Thread(target=long_request)
    client.start()
    deadline = time.monotonic() + 60
    while running_generations(url) < 1:
        assert time.monotonic() < deadline and client.is_alive(), "the long request never started generating"
        time.sleep(0.05)

    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # Draining: still listening, refusing new work with a clear 503, not ready, alive.
    ready = httpx.get(f"{url}/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "stopping"
    refused = httpx.post(f"{url}/api/v1/chat", headers=APP_AUTH, json={"text": "Halo", "max_new_tokens": 2}, timeout=10)
    assert refused.status_code == 503, refused.text
    assert "shutting down" in refused.json()["detail"] and int(refused.headers["Retry-After"]) > 0
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert client.is_alive(), "the long request should still be generating during these checks"

    client.join(600)
    assert outcome["status"] == 200, outcome
    body = outcome["body"]
    assert isinstance(body, dict) and body["generated_text"]
    assert body["output_length"] > max_new_tokens // 2  # it ran on after the signal, not cut short
    assert float(outcome["at"]) > signalled  # type: ignore[arg-type]
    assert server.process.wait(60) == 0, server.log()
    log = server.log()
    assert "shutdown requested" in log
    assert APP_KEY not in log


def read_reply(url: str, stream: bool, seen: dict[str, object]) -> None:
    """One request for a long reply, recorded in `seen`: its deltas (if streamed), and whether it was completed."""
    seen.update(deltas=0, complete=False)
    body = {**LONG_REQUEST, "max_new_tokens": LONG_REPLY_TOKENS, "stream": stream}
    try:
        with httpx.stream("POST", f"{url}/api/v1/generate-text", headers=APP_AUTH, json=body, timeout=600) as response:
            seen["status"] = response.status_code
            for line in response.iter_lines():
                if line == "event: delta":
                    seen["deltas"] = int(seen["deltas"]) + 1  # type: ignore[call-overload]
                elif line == "event: complete" or (not stream and response.status_code == 200 and line):
                    seen["complete"] = True
    except httpx.HTTPError as error:  # the server went away mid-reply: that is the point
        seen["error"] = repr(error)


def start_long_replies(url: str) -> list[tuple[threading.Thread, dict[str, object]]]:
    """A streamed and a plain request for long replies (LONG_REQUEST runs long), both admitted, the first streaming."""
    replies: list[tuple[threading.Thread, dict[str, object]]] = []
    deadline = time.monotonic() + 120  # liveness only

    def wait_until(condition: Callable[[], bool], what: str) -> None:
        while not condition():
            assert time.monotonic() < deadline and all(c.is_alive() for c, _ in replies), f"{what}: {replies}"
            time.sleep(0.05)

    for stream in (True, False):
        seen: dict[str, object] = {}
        client = threading.Thread(target=read_reply, args=(url, stream, seen), daemon=True)
        client.start()
        replies.append((client, seen))
        if stream:
            wait_until(lambda: int(replies[0][1].get("deltas", 0)) >= 3, "the streamed reply never started")  # type: ignore[call-overload]
    wait_until(
        lambda: engine_gauge(url, "running_requests") + engine_gauge(url, "queue_depth") >= 2,
        "the plain request was never admitted",
    )
    return replies


def assert_cut_short(replies: list[tuple[threading.Thread, dict[str, object]]]) -> None:
    """Each reply ended without being completed: the process stopped them rather than waiting for their end."""
    for client, seen in replies:
        client.join(60)
        assert not client.is_alive()
        assert not seen["complete"], seen
        assert int(seen["deltas"]) < LONG_REPLY_TOKENS, seen  # type: ignore[call-overload]


def test_the_shutdown_timeout_bounds_the_wait(settings: Settings, embedded_model: LoadedModel) -> None:
    served = start_server(settings, SHUTDOWN_TIMEOUT_S="1")
    try:
        replies = start_long_replies(served.url)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(300) == 0, served.log()
        assert_cut_short(replies)
        assert "shutdown timeout of 1 s reached" in served.log()
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(10)


def test_a_second_signal_skips_the_drain(settings: Settings, embedded_model: LoadedModel) -> None:
    served = start_server(settings, SHUTDOWN_TIMEOUT_S="600")  # the drain alone would wait for the whole reply
    try:
        replies = start_long_replies(served.url)
        served.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while httpx.get(f"{served.url}/ready", timeout=10).status_code != 503:  # draining now
            assert time.monotonic() < deadline, "the first signal did not start the drain"
            time.sleep(0.05)
        assert served.process.poll() is None and all(c.is_alive() for c, _ in replies)  # the drain waits ...
        served.process.send_signal(signal.SIGTERM)  # ... and the second signal does not
        assert served.process.wait(300) == 0, served.log()
        assert_cut_short(replies)
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait(10)
