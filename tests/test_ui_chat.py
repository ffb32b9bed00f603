"""The chat page's function, called directly: it streams from the engine and its stop frees the model."""

from __future__ import annotations

import asyncio
import itertools

from fastapi.testclient import TestClient

from inference import SequentialEngine
from inference.settings import Settings
from webapp.ui import ChatHandler


def test_page_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()


def test_chat_function_streams_growing_text(settings: Settings, engine: SequentialEngine) -> None:
    async def run() -> list[str]:
        handler = ChatHandler(engine, settings)
        return [text async for text in handler("Halo, apa kabar?", [], "", 10, 0.0)]

    outputs = asyncio.run(run())
    assert len(outputs) >= 2
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(outputs))
    assert len(outputs[-1]) > len(outputs[0])


def test_stop_button_cancels_generation(settings: Settings, engine: SequentialEngine) -> None:
    async def run() -> int:
        handler = ChatHandler(engine, settings)
        before = engine.generated_tokens_total
        replies = handler("Tulis cerita yang sangat panjang.", [], "", 1500, 0.0)
        for _ in range(3):
            await replies.__anext__()
        await replies.aclose()  # what Gradio does when the stop button cancels the event
        result = [text async for text in handler("Halo", [], "", 3, 0.0)]
        assert result
        return engine.generated_tokens_total - before

    assert asyncio.run(run()) < 100
