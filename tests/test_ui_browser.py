"""The chat page in a real browser: Debian's Chromium, headless, driven by Playwright.

A real uvicorn server (the whole app, embedded model, the default batched engine) runs in a thread on a free
loopback port; each test gets a fresh browser context (empty localStorage). Generations are kept short, but for
the one Stop cuts short (on both engines).
Chromium comes from apt (`make browser`); `playwright install` is never needed.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from inference import BatchedEngine, GenerationRequest, SequentialEngine, StreamEvent
from inference.model.loading import LoadedModel
from tests.helpers import API_KEY, ROOT, TIMEOUT_MS, serve, skip_without_chromium
from webapp.server import create_app
from webapp.settings import Settings

ARTIFACTS = ROOT / "test-artifacts"

skip_without_chromium()

expect.set_options(timeout=TIMEOUT_MS)


class Counting:
    """Mixin for a real engine: counts finished generations (the engine stream closed, whatever the reason) so a
    test knows when a reply is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finished = 0

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        return self._counted(await super().submit(request))  # type: ignore[misc]

    async def _counted(self, inner: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        try:
            async for event in inner:
                yield event
        finally:
            await inner.aclose()  # type: ignore[attr-defined]  # passes a Stop on to the real stream at once
            self.finished += 1


class CountingEngine(Counting, BatchedEngine):
    """The engine users get (ENGINE=batched), counting finished generations."""


class CountingSequentialEngine(Counting, SequentialEngine):
    """ENGINE=sequential, counting finished generations."""


@pytest.fixture(scope="module")
def ui_engine(settings: Settings, embedded_model: LoadedModel) -> CountingEngine:
    engine = CountingEngine(settings, loader=lambda _settings: embedded_model)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def url(settings: Settings, ui_engine: CountingEngine) -> Iterator[str]:
    with serve(create_app(settings, ui_engine, [API_KEY])) as base_url:
        yield base_url


@pytest.fixture(scope="module", autouse=True)
def screenshots_of_this_run_only() -> None:
    """test-artifacts/ keeps the screenshots of this run only: older ones go before the module's first test."""
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="id-ID")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


# ---------------------------------------------------------------- helpers


def open_chat(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#banner")).to_contain_text("SmolLM2")
    expect(page.locator("#message textarea")).to_be_editable()  # the stored chat has been restored


def open_settings(page: Page) -> None:
    if page.locator("#max-new-tokens").is_visible():
        return
    page.locator("#settings").get_by_text(re.compile("Pengaturan|Settings")).first.click()
    expect(page.locator("#max-new-tokens")).to_be_visible()
    page.wait_for_timeout(300)  # let the panel's widgets settle after their first mount


def set_number(page: Page, elem_id: str, value: float) -> None:
    """Type into a slider's (or a Number's) number box, as a user would."""
    open_settings(page)
    box = page.locator(f"#{elem_id} input[type=number]")
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(200)
        if box.input_value() == str(value):
            return
        # Seen on a loaded machine when typing right after the settings panel first opened: the
        # widget went back to the value it was mounted with. Keep evidence, and type again.
        screenshot(page, f"set-{elem_id}-attempt-{attempt}.png")
    raise AssertionError(f"#{elem_id} shows {box.input_value()!r} after typing {value!r} three times")


def bot_messages(page: Page) -> list[str]:
    """The reply texts in the chat (notes such as stats excluded)."""
    texts = page.locator('#chatbot [data-testid="bot"]').evaluate_all(
        "els => els.filter(e => !e.querySelector('.thought-group')).map(e => e.innerText)"
    )
    return [text.strip() for text in texts]


def stats_titles(page: Page) -> list[str]:
    return re.findall(r"📊[^\n]*", page.locator("#chatbot").inner_text())


def send(page: Page, engine: Counting, text: str) -> None:
    """Send `text` and wait until its reply is complete (the engine finished, the page is idle)."""
    before = engine.finished
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()
    wait_for_generation(page, engine, before)


def wait_for_generation(page: Page, engine: Counting, before: int) -> None:
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while engine.finished <= before:
        assert time.monotonic() < deadline, "the reply did not finish"
        page.wait_for_timeout(50)
    expect(page.locator("#send")).to_be_visible()  # the page's own "done" step ran
    expect(page.locator("#stop")).to_be_hidden()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)  # git-ignored
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# ---------------------------------------------------------------- tests


def test_reply_streams_grows_and_finishes_with_stats(page: Page, url: str, ui_engine: CountingEngine) -> None:
    open_chat(page, url)
    banner = page.locator("#banner")
    expect(banner).to_contain_text("Mode demo")
    expect(banner).to_contain_text("bukan sahabat-ai")
    expect(page.locator("#send")).to_have_text("Kirim")
    set_number(page, "max-new-tokens", 24)
    # Record the reply's length at every DOM change, to see it grow while it streams.
    page.evaluate(
        """() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
                if (bots.length) window.__lengths.push(bots[0].innerText.length);
            }).observe(document.querySelector('#chatbot'), {childList: true, subtree: true, characterData: true});
        }"""
    )
    before = ui_engine.finished
    page.locator("#message textarea").fill("Sopo wae sing ana ing Punakawan?")
    page.locator("#message textarea").press("Enter")
    expect(page.locator("#stop")).to_be_visible()
    wait_for_generation(page, ui_engine, before)

    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) >= 3, f"the reply did not stream: {lengths}"
    reply = bot_messages(page)[0]
    assert reply
    [stats] = stats_titles(page)
    match = re.fullmatch(r"📊 (\d+) token · TTFT \d+,\d\d dtk · \d+,\d token/dtk", stats)
    assert match, stats
    assert 0 < int(match.group(1)) <= 24
    expect(page.locator("#chatbot")).to_contain_text("Sopo wae sing ana ing Punakawan?")
    expect(page.locator("#message textarea")).to_have_value("")
    expect(page.locator("#chatbot button[aria-label='Copy message']").first).to_be_visible()
    screenshot(page, "chat-reply.png")


@pytest.fixture(params=["batched", "sequential"])
def any_engine_url(
    request: pytest.FixtureRequest, settings: Settings, embedded_model: LoadedModel
) -> Iterator[tuple[str, Counting]]:
    """The module's server (batched engine), or one of its own on the sequential engine."""
    if request.param == "batched":
        yield request.getfixturevalue("url"), request.getfixturevalue("ui_engine")
        return
    engine = CountingSequentialEngine(settings, loader=lambda _settings: embedded_model)
    engine.load()
    with serve(create_app(settings, engine, [API_KEY])) as base_url:  # its lifespan closes the engine
        yield base_url, engine


# Runs to the limit uncancelled, greedy, in both engines (measured: 450 of 450 tokens; see tests/test_cancellation.py).
LONG_PROMPT = "Hitung dari 1 sampai 400, satu angka per baris."


def test_stop_mid_stream(page: Page, any_engine_url: tuple[str, Counting]) -> None:
    url, engine = any_engine_url
    open_chat(page, url)
    set_number(page, "max-new-tokens", 400)
    set_number(page, "temperature", 0)
    before = engine.finished
    page.locator("#message textarea").fill(LONG_PROMPT)
    page.locator("#send").click()
    expect(page.locator('#chatbot [data-testid="bot"]').first).not_to_have_text("")
    expect(page.locator("#message textarea")).to_be_disabled()  # no second message mid-reply
    expect(page.locator("#retry")).to_be_disabled()
    screenshot(page, "chat-streaming.png")
    at_click = engine.generated_tokens_total
    page.locator("#stop").click()
    expect(page.locator("#chatbot")).to_contain_text("Dihentikan")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#message textarea")).to_be_editable()
    wait_until(lambda: engine.finished == before + 1)  # the page's handler closed the engine's stream ...
    at_close = engine.generated_tokens_total
    wait_until(lambda: engine.running == 0)  # ... and the generation is gone:
    assert engine.generated_tokens_total - at_close <= 2  # at most the token in the works when the stream closed,
    # and few between the click and the close (the page's round trip; measured: 1): not the 300+ the reply had left.
    assert engine.generated_tokens_total - at_click < 48, engine.generated_tokens_total - at_click
    partial = bot_messages(page)[0]
    page.wait_for_timeout(1500)
    assert bot_messages(page)[0] == partial, "the reply kept growing after Stop"
    assert stats_titles(page) == []
    # The model is free again: a short reply runs alone (the engine counts its 3 tokens and nothing else).
    set_number(page, "max-new-tokens", 3)
    tokens_before = engine.generated_tokens_total
    send(page, engine, "Tulis cerita panjang tentang seekor kucing.")
    assert stats_titles(page)[-1].startswith("📊 3 token ·")
    assert engine.generated_tokens_total - tokens_before == 3


def wait_until(condition: Any) -> None:
    deadline = time.monotonic() + 300  # only against a hang: a generation that ignored Stop ends well before
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_max_new_tokens_setting_takes_effect(page: Page, url: str, ui_engine: CountingEngine) -> None:
    open_chat(page, url)
    before = ui_engine.finished
    page.locator("#send").click()  # an empty message: nothing happens, no error shown
    page.wait_for_timeout(500)
    assert ui_engine.finished == before
    expect(page.locator(".toast-body")).to_have_count(0)
    set_number(page, "max-new-tokens", 3)
    send(page, ui_engine, "Tulis cerita panjang tentang seekor kucing.")
    assert stats_titles(page)[0].startswith("📊 3 token ·")


def test_seed_makes_retry_reproducible(page: Page, url: str, ui_engine: CountingEngine) -> None:
    open_chat(page, url)
    set_number(page, "max-new-tokens", 10)
    set_number(page, "temperature", 1.5)
    set_number(page, "seed", 1234)
    send(page, ui_engine, "Tulis puisi pendek tentang laut.")
    first = bot_messages(page)

    def retry() -> list[str]:
        before = ui_engine.finished
        page.locator("#retry").click()
        wait_for_generation(page, ui_engine, before)
        return bot_messages(page)

    assert retry() == first  # same seed, same conversation: same reply
    assert len(stats_titles(page)) == 1  # the old reply and its stats were replaced
    set_number(page, "seed", 99)
    assert retry() != first


def test_reload_keeps_conversation_language_and_settings(page: Page, url: str, ui_engine: CountingEngine) -> None:
    open_chat(page, url)
    set_number(page, "max-new-tokens", 6)
    send(page, ui_engine, "Apa ibu kota Indonesia?")
    reply, stats = bot_messages(page), stats_titles(page)
    page.get_by_text("English", exact=True).click()
    expect(page.locator("#send")).to_have_text("Send")

    page.reload()
    expect(page.locator("#chatbot")).to_contain_text("Apa ibu kota Indonesia?")
    expect(page.locator("#send")).to_have_text("Send")
    assert bot_messages(page) == reply
    assert stats_titles(page) == stats
    open_settings(page)
    expect(page.locator("#max-new-tokens input[type=number]")).to_have_value("6")


def test_language_switch(page: Page, url: str) -> None:
    open_chat(page, url)
    page.get_by_text("English", exact=True).click()
    expect(page.locator("#send")).to_have_text("Send")
    expect(page.locator("#retry")).to_contain_text("Retry")
    expect(page.locator("#banner")).to_contain_text("Demo mode")
    expect(page.locator("#banner")).to_contain_text("Quantization")
    expect(page.locator("#message")).to_contain_text("Message")
    open_settings(page)
    expect(page.locator("#max-new-tokens")).to_contain_text("Max new tokens")
    screenshot(page, "chat-english.png")
    page.get_by_text("Bahasa Indonesia", exact=True).click()
    expect(page.locator("#send")).to_have_text("Kirim")
    expect(page.locator("#max-new-tokens")).to_contain_text("Maks. token baru")
    expect(page.locator("#banner")).to_contain_text("Kuantisasi")


def test_examples_undo_and_clear(page: Page, url: str, ui_engine: CountingEngine) -> None:
    open_chat(page, url)
    page.locator("#examples").get_by_text("Ceritakne babagan sejarah Jawa").click()
    expect(page.locator("#message textarea")).to_have_value("Ceritakne babagan sejarah Jawa")
    set_number(page, "max-new-tokens", 3)
    page.locator("#message textarea").fill("")
    send(page, ui_engine, "Halo")
    send(page, ui_engine, "Apa kabar?")
    assert len(stats_titles(page)) == 2

    page.locator("#undo").click()  # the last turn goes; its message comes back to the textbox
    expect(page.locator("#message textarea")).to_have_value("Apa kabar?")
    expect(page.locator("#chatbot")).not_to_contain_text("Apa kabar?")
    assert len(stats_titles(page)) == 1

    page.locator("#clear").click()
    expect(page.locator("#chatbot")).not_to_contain_text("Halo")
    page.reload()
    expect(page.locator("#banner")).to_contain_text("SmolLM2")
    page.wait_for_timeout(500)
    expect(page.locator("#chatbot")).not_to_contain_text("Halo")


def test_loading_state_then_ready(page: Page, settings: Settings, embedded_model: LoadedModel) -> None:
    """While the model loads, the page says so (and answers a message in words); then it refreshes itself."""
    release = threading.Event()

    def slow_loader(_settings: Settings) -> LoadedModel:
        release.wait(timeout=120)
        return embedded_model

    engine = CountingEngine(settings, loader=slow_loader)
    with serve(create_app(settings, engine, [API_KEY])) as base_url:
        try:
            page.goto(base_url)
            expect(page.locator("#banner")).to_contain_text("Model sedang dimuat")
            page.locator("#message textarea").fill("Halo")
            page.locator("#send").click()
            expect(page.locator("#chatbot")).to_contain_text("Model belum siap")
            expect(page.locator("#chatbot")).to_contain_text("Model sedang dimuat")
            expect(page.locator("#send")).to_be_visible()
        finally:
            release.set()
        expect(page.locator("#banner")).to_contain_text("SmolLM2", timeout=15_000)  # no reload needed
        set_number(page, "max-new-tokens", 3)
        before = engine.finished
        page.locator("#retry").click()
        wait_for_generation(page, engine, before)
        assert stats_titles(page)[-1].startswith("📊 ")
        page.close()  # before the server stops, so it need not wait for the page's connections
