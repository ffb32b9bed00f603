"""SSE keep-alives: streams carry `: ping` comment lines (sse-starlette's ping), and clients that ignore comment
lines, as docs/api.md says they can, read the same events and text as without them.

The service pings every SSE_PING_SECONDS (15 s); the test shortens it to 1 ms, far below the time of one
decoding step, so every generation's stream carries pings between its events, on a fast machine or a slow one.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import AUTH, LiveServer, openai_client, sse_events_from_lines
from webapp.api import sse

PING_SECONDS = 0.001


@pytest.fixture
def pinging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "SSE_PING_SECONDS", PING_SECONDS)


def test_spec_stream_carries_pings_and_the_events_are_unchanged(live_server: LiveServer, pinging: None) -> None:
    body = {"text": "Sebutkan tiga pulau di Indonesia.", "max_new_tokens": 8, "temperature": 0}
    with httpx.stream(
        "POST", f"{live_server.base_url}/api/v1/generate-text", headers=AUTH, json={**body, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    pings = [line for line in lines if line.startswith(":")]
    assert pings and all(line.startswith(": ping") for line in pings), lines[:20]
    events = list(sse_events_from_lines(lines))
    deltas = [json.loads(data)["delta"] for event, data in events if event == "delta"]
    assert [event for event, _ in events if event != "delta"] == ["complete"]
    final = json.loads(events[-1][1])
    assert deltas and "".join(deltas) == final["generated_text"]
    plain = httpx.post(f"{live_server.base_url}/api/v1/generate-text", headers=AUTH, json=body, timeout=120).json()
    assert final == plain


def test_the_official_client_reads_a_pinged_stream(live_server: LiveServer, pinging: None) -> None:
    oai = openai_client(live_server, timeout=120)
    messages = [{"role": "user", "content": "Sebutkan tiga pulau di Indonesia."}]
    with httpx.stream(
        "POST",
        f"{live_server.base_url}/v1/chat/completions",
        headers=AUTH,
        json={"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True},
        timeout=120,
    ) as response:
        assert any(line.startswith(": ping") for line in response.iter_lines())
    chunks = list(
        oai.chat.completions.create(
            model="sahabat-ai",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = oai.chat.completions.create(model="sahabat-ai", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert text and text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
