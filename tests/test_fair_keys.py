"""Fair keys (issue 28): one API key flooding the service cannot starve the others.

The local engines admit waiting requests round-robin across clients (`GenerationRequest.client`, the API key's
`key-<n>`), FIFO within one; MAX_RUNNING_PER_KEY caps one key's running requests while the others are admitted.
Real generation with the embedded model; every wait is bounded by token counts (a hang guard aside).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import pytest

from inference import GenerationRequest, GenerationResult, Message
from inference.engines.fair_queue import FairQueue
from inference.model.loading import LoadedModel
from tests.helpers import ENGINE_KINDS, collect, engine_for, sse_events, start_live_server
from webapp.settings import Settings

# Runs to its limit uncancelled, greedy (tests/test_cancellation.py measures 450 of 450 tokens): a row that holds its
# slot until the test lets it go.
LONG_PROMPT = "Hitung dari 1 sampai 400, satu angka per baris."
KEY_A, KEY_B = "sk-flooding-key-a-5f1c", "sk-patient-key-b-90d3"
FLOOD = 6  # key A's requests queued ahead of key B's one


def ask(text: str, client: str | None, max_new_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("user", text),), max_new_tokens=max_new_tokens, temperature=0, client=client
    )


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120  # a hang guard only: each condition follows from token counts
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_queue_takes_clients_in_turn_and_skips_those_at_their_cap() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3"):
        queue.push("A", item)
    queue.push("B", "b1")
    queue.push(None, "anonymous1")
    assert [queue.pop() for _ in range(3)] == ["a1", "b1", "anonymous1"]
    queue.push("B", "b2")
    assert queue.pop(lambda client: client != "A") == "b2"  # A at its cap: B goes first, A keeps its place
    assert queue.pop(lambda client: client != "A") is None and len(queue) == 2
    assert queue.remove("A", "a2") and not queue.remove("A", "a2")
    assert queue.drop_stale(lambda item: item == "a3") == ["a3"] and not queue and queue.pop() is None


@pytest.mark.parametrize("kind", ENGINE_KINDS)
async def test_a_flooding_key_does_not_starve_another(
    settings: Settings, embedded_model: LoadedModel, kind: str
) -> None:
    """One slot (one row, or the sequential engine's one generation), held by a blocker while key A queues FLOOD
    requests and then key B one; once the slot frees up, B's request is served second, not after all of A's."""
    engine = engine_for(settings.model_copy(update={"max_batch": 1, "max_queue": 16}), embedded_model, kind)
    try:
        blocker = await engine.submit(ask(LONG_PROMPT, "key-3", max_new_tokens=400))
        await blocker.__anext__()  # type: ignore[attr-defined]  # its first delta: it holds the slot
        labelled = [(f"A{n}", ask(f"Halo {n}", "key-1")) for n in range(FLOOD)] + [("B", ask("Halo B", "key-2"))]
        order: list[str] = []

        async def served(label: str, request: GenerationRequest) -> GenerationResult:
            _, result = await collect(await engine.submit(request))
            order.append(label)
            return result

        # The sequential engine queues a job when its stream is first read: the tasks start in this order.
        tasks = [asyncio.ensure_future(served(label, request)) for label, request in labelled]
        while engine.queue_depth < len(labelled):  # all queued behind the blocker (it runs to 400 tokens)
            await asyncio.sleep(0.01)
        await blocker.aclose()  # type: ignore[attr-defined]
        results = await asyncio.gather(*tasks)
        assert all(result.output_length > 0 for result in results)
        assert order[1] == "B", order  # A0, then B (first in FIFO order: B after all six of A's)
        assert order == ["A0", "B", *(f"A{n}" for n in range(1, FLOOD))]
    finally:
        engine.close()


def test_a_key_at_its_cap_waits_while_another_key_runs(settings: Settings, embedded_model: LoadedModel) -> None:
    """MAX_RUNNING_PER_KEY=1 over HTTP, room for four rows: key A's second request waits while A's first runs, and
    key B's request, sent after it, runs and ends meanwhile; A's second runs once A's first is gone."""
    capped = settings.model_copy(update={"max_batch": 4, "max_queue": 8, "max_running_per_key": 1})
    engine = engine_for(capped, embedded_model, "batched")
    clients: list[str | None] = []
    engine.add_result_listener(lambda request, _result: clients.append(request.client))
    live = start_live_server(capped, engine, api_keys=[KEY_A, KEY_B])
    url = f"{live.base_url}/api/v1/generate-text"
    a, b = ({"Authorization": f"Bearer {key}"} for key in (KEY_A, KEY_B))
    long_body = {"text": LONG_PROMPT, "max_new_tokens": 400, "temperature": 0, "stream": True}
    short_body = {"text": "Halo", "max_new_tokens": 4, "temperature": 0}
    try:
        with httpx.stream("POST", url, headers=a, json=long_body, timeout=600) as first:
            assert first.status_code == 200
            first_events = sse_events(first)  # kept: a closed generator would close the connection
            assert next(first_events)[0] == "delta"  # A's first request is generating
            with httpx.stream("POST", url, headers=a, json={**short_body, "stream": True}, timeout=600) as second:
                assert second.status_code == 200  # admitted: queued behind A's cap
                wait_for(lambda: engine.queue_depth == 1, "A's second request to wait")
                other = httpx.post(url, headers=b, json=short_body, timeout=600)  # B: runs beside A's first
                assert other.status_code == 200, other.text
                assert other.json()["output_length"] == 4
                # B is done after its 4 tokens, A's first (400 tokens) still runs: A's second still waits.
                assert (engine.running, engine.queue_depth) == (1, 1)
                first.close()  # A's first leaves: its row frees at the next step, and A's second is admitted
                events = list(sse_events(second))
                assert events[-1][0] == "complete", events[-1]
                assert json.loads(events[-1][1])["output_length"] == 4
        wait_for(lambda: engine.running == 0 and engine.queue_depth == 0, "the engine to be idle")
        assert set(clients) == {"key-1", "key-2"}  # the keys' places in API_KEYS, never the keys
    finally:
        live.server.should_exit = True
        engine.close()
