"""The page's layout: `build_ui` (the Blocks, their wiring and event names), the CSS, and `mount_ui` at `/`.

`build_ui` lays the page out top to bottom from its parts (`_build_header`, `_build_chat_column`, `_build_examples`,
`_build_settings_panel`), gathers the components they share in a `_Page`, then wires the events (`_wire_chat_events`,
`_wire_preferences`, `_wire_page_events`), in that order: the order of the components and of the events is the
order of their ids in the page's config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from fastapi import FastAPI

from inference import Engine
from webapp.settings import Settings
from webapp.ui.chat import SEED_MAX, TOP_K_MAX, ChatOptions, ChatUI, banner_markdown
from webapp.ui.chat_api import API_NAME, chat_endpoint
from webapp.ui.texts import DEFAULT_LANGUAGE, EXAMPLE_LANGUAGE_NAMES, EXAMPLES, LANGUAGE_CHOICES, tr

# The conversation and the preferences are kept in the browser's localStorage under fixed keys, so
# they survive a reload and a server restart. The "secret" only obfuscates: the browser holds it too.
CHAT_STORAGE_KEY = "sahabat-ai-chat-v1"
PREFS_STORAGE_KEY = "sahabat-ai-prefs-v1"
STORAGE_SECRET = "sahabat-ai-page"  # not a credential; see above

LOADING_REFRESH_S = 2.0

# The settings of every event but the streaming reply: no queue, hidden from the API, no progress shown.
_QUICK: dict[str, Any] = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}


@dataclass(frozen=True)
class _ChatColumn:
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    undo: gr.Button
    clear: gr.Button

    @property
    def controls(self) -> list[Any]:
        """The outputs of ChatUI.busy and ChatUI.idle."""
        return [self.send, self.stop, self.message, self.retry, self.undo, self.clear]


@dataclass(frozen=True)
class _SettingsPanel:
    panel: gr.Accordion
    system_message: gr.Textbox
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number

    @property
    def option_inputs(self) -> list[Any]:
        """The options of a reply, in the order of ChatUI.respond's parameters (and of the saved preferences)."""
        return [
            self.system_message,
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.seed,
        ]


@dataclass(frozen=True)
class _Page:
    """The components the parts of the page share."""

    ui: ChatUI
    saved_chat: gr.BrowserState
    saved_prefs: gr.BrowserState
    banner: gr.Markdown
    language: gr.Radio
    timer: gr.Timer
    chat: _ChatColumn
    examples: gr.Dataset
    settings: _SettingsPanel
    footer: gr.Markdown


def build_ui(engine: Engine, settings: Settings) -> gr.Blocks:
    ui = ChatUI(engine, settings)
    lang = DEFAULT_LANGUAGE
    defaults = ui.default_options()
    cap = settings.max_new_tokens_cap
    with gr.Blocks(title="Sahabat-AI Chat") as demo:
        saved_chat = gr.BrowserState([], storage_key=CHAT_STORAGE_KEY, secret=STORAGE_SECRET)
        saved_prefs = gr.BrowserState({}, storage_key=PREFS_STORAGE_KEY, secret=STORAGE_SECRET)
        banner, language = _build_header(engine, lang)
        timer = gr.Timer(LOADING_REFRESH_S, active=False)
        chat = _build_chat_column(lang)
        examples = _build_examples(lang)
        settings_panel = _build_settings_panel(lang, defaults, cap)
        footer = gr.Markdown(tr(lang, "footer"), elem_id="footer")
        page = _Page(ui, saved_chat, saved_prefs, banner, language, timer, chat, examples, settings_panel, footer)

        _wire_chat_events(page)
        _wire_preferences(page)
        _wire_page_events(demo, page, engine, settings)
    return demo


def _build_header(engine: Engine, lang: str) -> tuple[gr.Markdown, gr.Radio]:
    """The banner (title, model, state) and the language switch beside it."""
    with gr.Row(equal_height=False):
        banner = gr.Markdown(banner_markdown(engine, lang), elem_id="banner")
        language = gr.Radio(
            LANGUAGE_CHOICES,
            value=lang,
            label=tr(lang, "language"),
            elem_id="language",
            scale=0,
            min_width=240,
        )
    return banner, language


def _build_chat_column(lang: str) -> _ChatColumn:
    """The chat, the message box with Send and Stop, and the Retry, Undo and Clear buttons."""
    chatbot = gr.Chatbot(
        label=tr(lang, "chatbot"),
        elem_id="chatbot",
        height=520,
        buttons=["copy", "copy_all"],
        feedback_options=None,
        placeholder=tr(lang, "placeholder"),
        layout="bubble",
        group_consecutive_messages=False,  # so a reply's copy button copies the reply, not its stats
    )
    with gr.Row():
        message = gr.Textbox(
            label=tr(lang, "message"),
            placeholder=tr(lang, "message_placeholder"),
            elem_id="message",
            lines=1,
            max_lines=8,
            scale=8,
            autofocus=True,
            interactive=False,  # until the stored conversation is restored (see `restore`)
        )
        send = gr.Button(tr(lang, "send"), variant="primary", elem_id="send", scale=1, min_width=100, interactive=False)
        stop = gr.Button(tr(lang, "stop"), variant="stop", elem_id="stop", scale=1, min_width=100, visible=False)
    with gr.Row():
        retry = gr.Button(tr(lang, "retry"), size="sm", elem_id="retry")
        undo = gr.Button(tr(lang, "undo"), size="sm", elem_id="undo")
        clear = gr.Button(tr(lang, "clear"), size="sm", elem_id="clear")
    return _ChatColumn(chatbot, message, send, stop, retry, undo, clear)


def _build_examples(lang: str) -> gr.Dataset:
    """One example message per language; a click puts it in the message box (see `_wire_chat_events`)."""
    return gr.Dataset(
        components=[gr.Textbox(visible=False)],
        samples=[[text] for _, text in EXAMPLES],  # not translated: they are samples of the languages
        sample_labels=[f"{text} ({EXAMPLE_LANGUAGE_NAMES[code]})" for code, text in EXAMPLES],
        label=tr(lang, "examples"),
        elem_id="examples",
        samples_per_page=len(EXAMPLES),
    )


def _build_settings_panel(lang: str, defaults: ChatOptions, cap: int) -> _SettingsPanel:
    """The folded settings: the system message and every sampling knob of the API, with the API's defaults."""
    with gr.Accordion(tr(lang, "settings"), open=False, elem_id="settings") as panel:
        system_message = gr.Textbox(
            defaults.system_message,
            label=tr(lang, "system"),
            info=tr(lang, "system_info"),
            lines=2,
            elem_id="system-message",
        )
        with gr.Row():
            max_new_tokens = gr.Slider(
                1,
                cap,
                value=defaults.max_new_tokens,
                step=1,
                label=tr(lang, "max_new_tokens"),
                info=tr(lang, "max_new_tokens_info"),
                elem_id="max-new-tokens",
            )
            temperature = gr.Slider(
                0.0,
                2.0,
                value=defaults.temperature,
                step=0.05,
                label=tr(lang, "temperature"),
                info=tr(lang, "temperature_info"),
                elem_id="temperature",
            )
        with gr.Row():
            top_p = gr.Slider(
                0.01, 1.0, value=1.0, step=0.01, label=tr(lang, "top_p"), info=tr(lang, "top_p_info"), elem_id="top-p"
            )
            top_k = gr.Slider(
                0, TOP_K_MAX, value=0, step=1, label=tr(lang, "top_k"), info=tr(lang, "top_k_info"), elem_id="top-k"
            )
        with gr.Row():
            repetition_penalty = gr.Slider(
                0.5,
                2.0,
                value=1.0,
                step=0.05,
                label=tr(lang, "repetition_penalty"),
                info=tr(lang, "repetition_penalty_info"),
                elem_id="repetition-penalty",
            )
            seed = gr.Number(
                None,
                label=tr(lang, "seed"),
                info=tr(lang, "seed_info"),
                precision=0,
                minimum=0,
                maximum=SEED_MAX,
                elem_id="seed",
            )
    return _SettingsPanel(panel, system_message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)


def _wire_chat_events(page: _Page) -> None:
    """Send, Retry, Stop, Undo, Clear and the examples."""
    ui, chat, language, saved_chat = page.ui, page.chat, page.language, page.saved_chat
    chatbot, message, send, controls = chat.chatbot, chat.message, chat.send, chat.controls  # see ChatUI.busy
    respond = {
        "fn": ui.respond,
        "inputs": [chatbot, *page.settings.option_inputs, language],
        "outputs": [chatbot],
        "concurrency_limit": None,  # the engine queues; Gradio's default of 1 would serialise users twice
        "api_visibility": "private",
        "show_progress": "minimal",
    }

    # The conversation is saved in the browser (localStorage) at the end of every action, by a
    # JS-only step: no server round trip. (A JS function's array result is read as one value per
    # output, hence the brackets.) Not on every chatbot change: the page's first, empty value
    # would overwrite the stored conversation before it is restored.
    save_chat = {"fn": None, "inputs": [chatbot], "outputs": [saved_chat], "js": "(history) => [history]", **_QUICK}

    # Send: show the message at once, then stream the reply.
    sent = gr.on([message.submit, send.click], ui.add_user_message, [message, chatbot], [message, chatbot], **_QUICK)
    sent_reply = sent.success(**save_chat).then(ui.busy, None, controls, **_QUICK).then(**respond)
    sent_reply.then(ui.idle, None, controls, **_QUICK).then(**save_chat)

    # Retry: drop the last reply (and its notes) and generate it again.
    retried = gr.on([chat.retry.click, chatbot.retry], ui.prepare_retry, [chatbot], [chatbot], **_QUICK)
    retried_reply = retried.then(ui.busy, None, controls, **_QUICK).then(**respond)
    retried_reply.then(ui.idle, None, controls, **_QUICK).then(**save_chat)

    # Stop cancels the streaming event; closing its generator cancels the generation in the engine.
    chat.stop.click(None, None, None, cancels=[sent_reply, retried_reply], **_QUICK).then(
        ui.mark_stopped, [chatbot, language], [chatbot], **_QUICK
    ).then(ui.idle, None, controls, **_QUICK).then(**save_chat)

    gr.on([chat.undo.click, chatbot.undo], ui.undo, [chatbot, message], [chatbot, message], **_QUICK).then(**save_chat)
    gr.on([chat.clear.click, chatbot.clear], lambda: [], None, [chatbot], **_QUICK).then(**save_chat)
    page.examples.click(lambda sample: sample[0], [page.examples], [message], **_QUICK)


def _wire_preferences(page: _Page) -> None:
    """Language and settings: saved in the browser when the user changes them (`.input`, not `.change`, for the
    same reason as the conversation: see `_wire_chat_events`)."""
    option_inputs = page.settings.option_inputs
    gr.on(
        [page.language.input, *(component.input for component in option_inputs)],
        None,
        [page.language, *option_inputs],
        [page.saved_prefs],
        js=(
            "(lang, system_message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) => "
            "[{lang, options: {system_message, max_new_tokens, temperature, top_p, top_k, "
            "repetition_penalty, seed}}]"
        ),
        **_QUICK,
    )


def _relabelling(page: _Page, engine: Engine) -> tuple[list[Any], Callable[[str], tuple[Any, ...]]]:
    """The components whose words change with the language, and the handler that gives their new words."""
    chat, options = page.chat, page.settings
    relabelled = [
        page.banner,
        *(chat.chatbot, chat.message, chat.send, chat.stop, chat.retry, chat.undo, chat.clear),
        page.examples,
        options.panel,
        *options.option_inputs,
        page.footer,
    ]

    def relabel(lang: str) -> tuple[Any, ...]:
        def field(key: str) -> Any:
            return gr.update(label=tr(lang, key), info=tr(lang, f"{key}_info"))

        return (
            banner_markdown(engine, lang),
            gr.update(label=tr(lang, "chatbot"), placeholder=tr(lang, "placeholder")),
            gr.update(label=tr(lang, "message"), placeholder=tr(lang, "message_placeholder")),
            gr.update(value=tr(lang, "send")),
            gr.update(value=tr(lang, "stop")),
            gr.update(value=tr(lang, "retry")),
            gr.update(value=tr(lang, "undo")),
            gr.update(value=tr(lang, "clear")),
            gr.update(label=tr(lang, "examples")),
            gr.update(label=tr(lang, "settings")),
            gr.update(label=tr(lang, "system"), info=tr(lang, "system_info")),
            field("max_new_tokens"),
            field("temperature"),
            field("top_p"),
            field("top_k"),
            field("repetition_penalty"),
            field("seed"),
            tr(lang, "footer"),
        )

    return relabelled, relabel


def _wire_page_events(demo: gr.Blocks, page: _Page, engine: Engine, settings: Settings) -> None:
    """The API endpoint, the language switch, the banner's refresh while the model loads, and the page's load."""
    relabelled, relabel = _relabelling(page, engine)

    # The one documented API endpoint (gradio_client: api_name="/chat"); every handler above is "private",
    # hidden from the API list (Gradio's queue still runs them for the page: see docs/security.md).
    gr.api(chat_endpoint(engine, settings), api_name=API_NAME, concurrency_limit=None)

    ui, language, banner, timer, chat = page.ui, page.language, page.banner, page.timer, page.chat
    language.change(relabel, [language], relabelled, **_QUICK)
    timer.tick(ui.refresh_banner, [language], [banner, timer], **_QUICK)
    demo.load(
        ui.restore,
        [page.saved_chat, page.saved_prefs],
        [chat.chatbot, language, *page.settings.option_inputs, banner, timer, chat.message, chat.send],
        **_QUICK,
    )


CSS = """
#banner h2 { margin-bottom: 0.2em; }
#banner blockquote { border-left: 4px solid #f59e0b; background: rgba(245, 158, 11, 0.08); padding: 0.4em 0.8em; }
#footer { font-size: 0.85em; opacity: 0.75; }
"""


# Gradio's queue looks for new events every 1 ms while it is idle (and for progress updates every 10 ms): ~1100
# wake-ups a second of the event loop, each one preempting a thread of the model's OpenMP team on a small CPU
# (measured under load: ~1000 involuntary context switches a second of the decode threads; ~200 with these).
# 20 ms is still instant for a person clicking Send; the page shows no progress bars.
UI_QUEUE_IDLE_POLL_S = 0.02
UI_PROGRESS_POLL_S = 0.1


def mount_ui(app: FastAPI, engine: Engine, settings: Settings) -> FastAPI:
    """Mount the chat page at `/` of `app`."""
    demo = build_ui(engine, settings)
    queue = getattr(demo, "_queue", None)  # private in Gradio 6; left alone if it ever goes away
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, UI_QUEUE_IDLE_POLL_S)
    if queue is not None and hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, UI_PROGRESS_POLL_S)
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=settings.gradio_credentials() or None,
        footer_links=["gradio", "settings"],
        css=CSS,
        theme=gr.themes.Soft(),
    )
