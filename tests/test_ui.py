"""The chat page's handlers, called directly (no browser): real generation, and faults forced by fakes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import gradio as gr
import pytest

from inference import (
    BatchedEngine,
    ContextTooLong,
    Engine,
    EngineBusy,
    EngineNotReady,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Message,
    ModelInfo,
    SequentialEngine,
    StreamEvent,
    TextDelta,
)
from inference.model.loading import LoadedModel
from webapp.api.spec.protocol import SamplingParams
from webapp.settings import Settings
from webapp.ui.chat import (
    ChatOptions,
    ChatUI,
    banner_markdown,
    clean_history,
    is_note,
    messages_of_history,
    note,
    stats_note,
)
from webapp.ui.texts import EXAMPLES, TEXTS

DEMO_INFO = ModelInfo(
    model_id="SmolLM2-135M-Instruct-Q4_1",
    quantization="none",
    dtype="bfloat16",
    device="cpu",
    context_length=8192,
    is_embedded_demo=True,
)


class FakeEngine(Engine):
    """Forces faults: `submit` raises `error`, or the stream yields `deltas` and then raises `fail_with`."""

    def __init__(
        self,
        error: Exception | None = None,
        *,
        deltas: tuple[str, ...] = ("Halo",),
        fail_with: Exception | None = None,
        state: str = "ready",
    ) -> None:
        super().__init__()
        self.state = state  # type: ignore[assignment]
        self.info = DEMO_INFO if state == "ready" else None
        self.error, self.deltas, self.fail_with = error, deltas, fail_with
        self.requests: list[GenerationRequest] = []
        self.closed_streams = 0

    def load(self) -> None:
        pass

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return self._stream()

    async def _stream(self) -> AsyncIterator[StreamEvent]:
        try:
            for delta in self.deltas:
                yield TextDelta(delta)
            if self.fail_with is not None:
                raise self.fail_with
            yield GenerationResult("".join(self.deltas), 10, len(self.deltas), "stop", 0.05, 0.5)
        finally:
            self.closed_streams += 1


class ShortContextEngine(FakeEngine):
    """Accepts at most `limit` messages: anything longer is ContextTooLong, as a real engine would say."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def submit(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self.requests.append(request)
        if len(request.messages) > self.limit:
            raise ContextTooLong(9000, request.max_new_tokens, 8192)
        return self._stream()


SETTINGS = Settings(model_id="embedded", _env_file=None)  # type: ignore[call-arg]
DEFAULT_INPUTS = ("", 16, 0.7, 1.0, 0, 1.0, None)


async def run(ui: ChatUI, history: list[dict[str, Any]], *inputs: Any, lang: str = "id") -> list[list[dict[str, Any]]]:
    """Every chat value `respond` yields, copied (it yields the same list object as it grows)."""
    values = inputs or DEFAULT_INPUTS
    return [[dict(m) for m in chat] async for chat in ui.respond(history, *values, lang)]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def note_titles(chat: list[dict[str, Any]]) -> list[str]:
    return [m["metadata"]["title"] for m in chat if is_note(m)]


def assert_no_traceback(chat: list[dict[str, Any]]) -> None:
    text = repr(chat)
    assert "Traceback" not in text and 'File "' not in text


# ---------------------------------------------------------------- real generation


async def test_reply_streams_and_ends_with_honest_stats(engine: SequentialEngine) -> None:
    ui = ChatUI(engine, SETTINGS)
    yields = await run(ui, [user("Sebutkan tiga pulau di Indonesia.")], "", 12, 0.0, 1.0, 0, 1.0, None)
    replies = [chat[1]["content"] for chat in yields if len(chat) > 1 and not is_note(chat[1])]
    assert len(replies) >= 3, "the reply should arrive in several pieces"
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(replies))
    final = yields[-1]
    assert [m["role"] for m in final] == ["user", "assistant", "assistant"]
    assert final[1]["content"] == replies[-1] and final[1]["content"].strip()
    title = note_titles(final)[-1]
    match = re.fullmatch(r"📊 (\d+) token · TTFT (\d+,\d\d) dtk · (\d+,\d) token/dtk", title)
    assert match, title
    assert 0 < int(match.group(1)) <= 12
    assert float(match.group(2).replace(",", ".")) > 0


async def test_max_new_tokens_and_seed_reach_the_engine(engine: SequentialEngine) -> None:
    ui = ChatUI(engine, SETTINGS)
    prompt = [user("Tulis cerita panjang tentang seekor kucing.")]
    short = (await run(ui, prompt, "", 3, 0.7, 1.0, 0, 1.0, 7))[-1]
    assert note_titles(short)[-1].startswith("📊 3 token ·")
    sampled = [(await run(ui, prompt, "", 10, 1.2, 1.0, 0, 1.0, seed))[-1][1]["content"] for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


# Runs to the limit uncancelled, greedy, in both engines (measured: 450 of 450 tokens; see tests/test_cancellation.py).
LONG_PROMPT = "Hitung dari 1 sampai 400, satu angka per baris."
LONG_TOKENS = 400


@pytest.fixture(scope="module", params=["sequential", "batched"])
def each_engine(request: pytest.FixtureRequest, settings: Settings, embedded_model: LoadedModel) -> Iterator[Engine]:
    engine_class = SequentialEngine if request.param == "sequential" else BatchedEngine
    engine = engine_class(settings, loader=lambda _settings: embedded_model)
    engine.load()
    yield engine
    engine.close()


async def test_closing_the_reply_early_frees_the_engine(each_engine: Engine) -> None:
    """Gradio closes the handler on Stop: the generation ends at the next token, counted on the engine's token counter
    (a generation that kept going for nobody would count hundreds more)."""
    engine = each_engine
    before = engine.generated_tokens_total
    replies = ChatUI(engine, SETTINGS).respond([user(LONG_PROMPT)], "", LONG_TOKENS, 0.0, 1.0, 0, 1.0, None, "id")
    for _ in range(3):
        chat = await anext(replies)
        assert chat[-1]["role"] == "assistant" and not is_note(chat[-1])  # the reply is growing
    await replies.aclose()  # what Gradio does on Stop
    at_close = engine.generated_tokens_total
    deadline = time.monotonic() + 300  # only against a hang: 400 tokens take far less
    while engine.running:
        assert time.monotonic() < deadline, "the generation is still running"
        await asyncio.sleep(0.01)
    assert engine.generated_tokens_total - at_close <= 2  # at most the token being computed when it closed
    assert engine.generated_tokens_total - before < 48
    after = await engine.generate(GenerationRequest(messages=(Message("user", "Halo"),), max_new_tokens=2))
    assert 0 < after.output_length <= 2


async def test_stop_closes_the_engine_stream() -> None:
    engine_ = FakeEngine(deltas=("satu ", "dua ", "tiga"))
    replies = ChatUI(engine_, SETTINGS).respond([user("Hitung")], *DEFAULT_INPUTS, "id")
    assert (await anext(replies))[-1] == assistant("satu ")
    assert engine_.closed_streams == 0
    await replies.aclose()  # Gradio closes the handler's generator on Stop or when the page goes away
    assert engine_.closed_streams == 1


# ---------------------------------------------------------------- failures, said in words


@pytest.mark.parametrize(
    ("engine_", "title", "detail"),
    [
        (FakeEngine(EngineBusy("queue full", retry_after_s=3)), "Server sedang sibuk", "3 detik"),
        (FakeEngine(EngineNotReady("model is loading"), state="loading"), "Model belum siap", "sedang dimuat"),
        (FakeEngine(EngineNotReady("model failed to load: x"), state="failed"), "Model belum siap", "gagal dimuat"),
        (FakeEngine(ContextTooLong(9000, 16, 8192)), "Pesan terlalu panjang", "9000 token"),
        (FakeEngine(InvalidRequest("roles must alternate")), "Permintaan tidak valid", "roles must alternate"),
        (FakeEngine(fail_with=GenerationFailed("generation failed: RuntimeError")), "Gagal membuat", "RuntimeError"),
        (FakeEngine(RuntimeError("/secret/path exploded")), "kesalahan tak terduga", "dicatat di server"),
    ],
)
async def test_failures_end_with_a_note_in_words(engine_: FakeEngine, title: str, detail: str) -> None:
    final = (await run(ChatUI(engine_, SETTINGS), [user("Halo")]))[-1]
    assert final[0] == user("Halo")  # the message stays, so Retry can send it again
    last = final[-1]
    assert is_note(last) and title in last["metadata"]["title"], last
    assert detail in last["content"]
    assert "/secret/path" not in repr(final)
    assert_no_traceback(final)
    assert engine_.closed_streams == (1 if engine_.error is None else 0)


async def test_failures_are_said_in_english_too() -> None:
    final = (await run(ChatUI(FakeEngine(EngineBusy("full", 2)), SETTINGS), [user("Hi")], lang="en"))[-1]
    assert final[-1]["metadata"]["title"] == "⚠️ The server is busy"
    assert "2 seconds" in final[-1]["content"]


async def test_partial_reply_is_kept_when_generation_fails() -> None:
    engine_ = FakeEngine(deltas=("Sebagian ", "jawaban"), fail_with=GenerationFailed("generation failed: X"))
    final = (await run(ChatUI(engine_, SETTINGS), [user("Halo")]))[-1]
    assert final[1] == assistant("Sebagian jawaban")
    assert "Gagal membuat jawaban" in final[2]["metadata"]["title"]


async def test_over_long_history_drops_oldest_turns_and_warns() -> None:
    engine_ = ShortContextEngine(limit=4)  # system + one earlier turn + the new message
    history = [user("satu"), assistant("1"), user("dua"), assistant("2"), user("tiga"), assistant("3"), user("empat")]
    final = (await run(ChatUI(engine_, SETTINGS), history, "Sistem.", 16, 0.7, 1.0, 0, 1.0, None))[-1]
    sent = engine_.requests[-1].messages
    assert [m.content for m in sent] == ["Sistem.", "tiga", "3", "empat"]
    assert "2 giliran terlama" in note_titles(final)[0]
    assert final[-2] == assistant("Halo") and note_titles(final)[-1].startswith("📊")


async def test_message_alone_too_long_is_a_note_not_a_loop() -> None:
    engine_ = ShortContextEngine(limit=0)
    final = (await run(ChatUI(engine_, SETTINGS), [user("a"), assistant("b"), user("c")]))[-1]
    assert "Pesan terlalu panjang" in final[-1]["metadata"]["title"]
    assert len(engine_.requests) == 2  # with the history, then without


async def test_nothing_to_answer_yields_the_chat_unchanged() -> None:
    engine_ = FakeEngine()
    ui = ChatUI(engine_, SETTINGS)
    done = [user("Halo"), assistant("Hai"), note("📊 1 token")]
    assert await run(ui, done) == [done]
    assert await run(ui, []) == [[]]
    assert engine_.requests == []


# ---------------------------------------------------------------- what the model is sent


async def test_request_carries_the_settings_and_clean_history() -> None:
    engine_ = FakeEngine()
    history = [
        user("lama"),
        note("⚠️ Server sedang sibuk"),  # a failed turn: its user message has no reply
        user("Apa iku Punakawan?"),
        assistant("Punakawan minangka..."),
        note("📊 5 token"),
        user("Jelasne luwih rinci"),
    ]
    await run(ChatUI(engine_, SETTINGS), history, "Jawab nganggo basa Jawa.", 99, 0.3, 0.9, 40, 1.1, 42)
    request = engine_.requests[-1]
    assert request.messages == (
        Message("system", "Jawab nganggo basa Jawa."),
        Message("user", "Apa iku Punakawan?"),
        Message("assistant", "Punakawan minangka..."),
        Message("user", "Jelasne luwih rinci"),
    )
    assert (request.max_new_tokens, request.temperature, request.top_p, request.top_k) == (99, 0.3, 0.9, 40)
    assert (request.repetition_penalty, request.seed) == (1.1, 42)


async def test_each_reply_carries_its_own_request_id() -> None:
    """The page has no HTTP request per reply, so each reply gets a fresh id of the kind the HTTP middleware makes,
    kept across the retries without the oldest turns: the engine's failure logs and a remote upstream carry it."""
    engine_ = ShortContextEngine(limit=4)
    ui = ChatUI(engine_, SETTINGS)
    history = [user("satu"), assistant("1"), user("dua"), assistant("2"), user("tiga")]
    await run(ui, history, "Sistem.", 16, 0.7, 1.0, 0, 1.0, None)
    first = {request.request_id for request in engine_.requests}
    assert len(engine_.requests) == 2 and len(first) == 1  # one retry without the oldest turn: the same reply
    (first_id,) = first
    assert re.fullmatch(r"[0-9a-f]{32}", first_id)
    await run(ui, [user("empat")])
    assert re.fullmatch(r"[0-9a-f]{32}", engine_.requests[-1].request_id)
    assert engine_.requests[-1].request_id != first_id


@pytest.mark.parametrize(
    ("engine_", "when"),
    [
        (FakeEngine(RuntimeError("exploded")), "before generation"),
        (FakeEngine(fail_with=KeyError("x")), "while generating"),
    ],
)
async def test_an_unexpected_page_failure_is_logged_with_the_reply_id(
    engine_: FakeEngine, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="webapp.ui.chat"):
        await run(ChatUI(engine_, SETTINGS), [user("Halo")])
    (request,) = engine_.requests
    assert re.fullmatch(r"[0-9a-f]{32}", request.request_id)
    assert [r.getMessage() for r in caplog.records] == [
        f"chat page: unexpected error {when} (request {request.request_id})"
    ]


def test_defaults_match_the_api() -> None:
    api = SamplingParams()
    options = ChatUI(FakeEngine(), SETTINGS).default_options()
    assert (options.max_new_tokens, options.temperature) == (api.max_new_tokens, api.temperature) == (256, 0.7)
    assert (options.top_p, options.top_k, options.repetition_penalty, options.seed) == (None, None, None, None)
    assert options.system_message == SETTINGS.chat_system_message
    # The widgets' "off" positions mean the API's defaults.
    assert ChatOptions.from_inputs("", 256, 0.7, 1.0, 0, 1.0, None, max_new_tokens_cap=2048) == replace(
        options, system_message=""
    )


def test_options_are_clamped_to_what_the_api_accepts() -> None:
    options = ChatOptions.from_inputs("  s  ", 10**6, 9, 0, 5000, 7, -3, max_new_tokens_cap=2048)
    assert options == ChatOptions("s", 2048, 2.0, 0.01, 200, 2.0, 0)
    junk = ChatOptions.from_inputs(None, "x", float("nan"), None, None, "", "abc", max_new_tokens_cap=100)
    assert junk == ChatOptions("", 100, 0.7, None, None, None, None)


def test_conversation_alternates_roles() -> None:
    history = [
        assistant("selamat datang"),  # leading reply: dropped
        user("a"),
        user("b"),  # "a" got no reply: dropped
        assistant("B1"),
        assistant("B2"),  # joined to B1
        note("📊"),
        user("c"),  # unanswered at the end: dropped
    ]
    assert messages_of_history(history) == [Message("user", "b"), Message("assistant", "B1B2")]


# ---------------------------------------------------------------- buttons and persistence


def test_retry_undo_and_stop_edit_the_chat() -> None:
    chat = [user("a"), assistant("A"), user("b"), assistant("B"), note("📊 1 token")]
    assert ChatUI.prepare_retry(chat) == chat[:3]
    assert ChatUI.undo(chat, "") == (chat[:2], "b")
    assert ChatUI.undo([], "draft") == ([], "draft")
    with pytest.raises(gr.Error):  # ends the send chain: nothing is generated
        ChatUI.add_user_message("  ", chat[:2])
    assert ChatUI.add_user_message("c", chat[:2]) == ("", [*chat[:2], user("c")])
    stopped = ChatUI.mark_stopped(chat[:4], "en")
    assert stopped[-1]["metadata"]["title"] == "⏹ Stopped"
    assert ChatUI.mark_stopped(chat, "id") == chat  # it had finished: nothing to mark


def test_stored_values_from_the_browser_are_sanitised() -> None:
    stored = [
        {"role": "user", "metadata": None, "content": [{"text": "Halo", "type": "text"}], "options": None},
        {"role": "assistant", "metadata": {"title": "📊 x", "status": "done", "id": 3}, "content": [], "options": None},
        {"role": "system", "content": "ignored"},
        "garbage",
    ]
    assert clean_history(stored) == [user("Halo"), {**note("📊 x", collapsed=True)}]
    assert clean_history("not a list") == []
    ui = ChatUI(FakeEngine(), SETTINGS)
    chat, lang, system, max_new, *_ = ui.restore({"bad": 1}, {"lang": "xx", "options": "nope"})
    assert (chat, lang, system, max_new) == ([], "id", SETTINGS.chat_system_message, 256)
    _, lang, _, max_new, temperature, top_p, top_k, penalty, seed, *_ = ui.restore(
        [], {"lang": "en", "options": {"max_new_tokens": 8, "temperature": 1.5, "top_k": 20, "seed": 3}}
    )
    assert (lang, max_new, temperature, top_p, top_k, penalty, seed) == ("en", 8, 1.5, 1.0, 20, 1.0, 3)


# ---------------------------------------------------------------- words on the page


def test_every_text_exists_in_both_languages() -> None:
    assert TEXTS["id"].keys() == TEXTS["en"].keys()
    assert all(TEXTS["id"][key] for key in TEXTS["id"])


def test_examples_cover_the_spec_and_three_languages() -> None:
    texts = [text for _, text in EXAMPLES]
    for spec in ("Sopo wae sing ana ing Punakawan?", "Ceritakne babagan sejarah Jawa", "Jelasne luwih rinci"):
        assert spec in texts
    assert {code for code, _ in EXAMPLES} == {"id", "jv", "su"}


def test_banner_says_what_is_served() -> None:
    demo = FakeEngine()
    text = banner_markdown(demo, "id")
    assert "SmolLM2-135M-Instruct-Q4_1" in text and "cpu" in text and "Mode demo" in text and "bukan sahabat-ai" in text
    assert "Demo mode" in banner_markdown(demo, "en")
    real = FakeEngine()
    real.info = replace(DEMO_INFO, model_id="GoToCompany/gemma2-9b", quantization="8bit", is_embedded_demo=False)
    text = banner_markdown(real, "id")
    assert "gemma2-9b" in text and "8bit" in text and "Mode demo" not in text
    assert "sedang dimuat" in banner_markdown(FakeEngine(state="loading"), "id")
    failed = FakeEngine(state="failed")
    failed.state_reason = "model failed to load: no GPU"
    assert "gagal dimuat" in banner_markdown(failed, "id") and "no GPU" in banner_markdown(failed, "id")


def test_stats_are_computed_from_the_result() -> None:
    result = GenerationResult("x", input_length=20, output_length=11, finish_reason="length", duration_s=2.0)
    en = stats_note(replace(result, time_to_first_token_s=0.5), "en")
    assert en["metadata"]["title"] == "📊 11 tokens · TTFT 0.50 s · 5.5 tokens/s"
    assert "after the first token: 6.7 tokens/s" in en["content"] and "max new tokens limit" in en["content"]
    assert stats_note(result, "id")["metadata"]["title"] == "📊 11 token · TTFT t/a · 5,5 token/dtk"


def test_the_mounted_page_does_not_poll_every_millisecond(settings: Settings) -> None:
    # Gradio's idle queue polls every 1 ms by default: ~1000 event-loop wake-ups a second that preempt the model's
    # threads on a small CPU. The mounted page polls less often (see webapp.ui.layout.UI_QUEUE_IDLE_POLL_S).
    from fastapi import FastAPI
    from starlette.routing import Mount

    from inference import SequentialEngine
    from webapp.ui.layout import UI_PROGRESS_POLL_S, UI_QUEUE_IDLE_POLL_S, mount_ui

    app = mount_ui(FastAPI(), SequentialEngine(settings), settings)
    gradio_apps = [route.app for route in app.routes if isinstance(route, Mount)]
    assert gradio_apps, "the chat page is not mounted"
    queue = gradio_apps[0].get_blocks()._queue
    assert queue.sleep_when_free >= UI_QUEUE_IDLE_POLL_S >= 0.01
    assert queue.progress_update_sleep_when_free >= UI_PROGRESS_POLL_S
