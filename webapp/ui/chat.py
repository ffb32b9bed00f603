"""The chat logic of the page, tested without a browser: the settings panel's values (`ChatOptions`), the history
helpers, the notes under replies (stats, errors), the banner, and `ChatUI`, the page's event handlers."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gradio as gr

from inference import (
    ContextTooLong,
    Engine,
    EngineBusy,
    EngineNotReady,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequest,
    Message,
    TextDelta,
)
from webapp.api.fields import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from webapp.middleware.observability import new_request_id
from webapp.settings import Settings
from webapp.ui.texts import format_number, language_of, tr

logger = logging.getLogger(__name__)

History = list[dict[str, Any]]

TOP_K_MAX = 200
SEED_MAX = 2**32 - 1


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class ChatOptions:
    """The settings panel's values, clamped to what the API accepts; None means the API's default."""

    system_message: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @classmethod
    def from_inputs(
        cls,
        system_message: Any,
        max_new_tokens: Any,
        temperature: Any,
        top_p: Any,
        top_k: Any,
        repetition_penalty: Any,
        seed: Any,
        *,
        max_new_tokens_cap: int,
    ) -> ChatOptions:
        """From the raw widget values (or a stored copy of them): out-of-range values are clamped."""
        top_p_value = _clamp(_float(top_p, 1.0), 0.01, 1.0)
        top_k_value = int(_clamp(_float(top_k, 0), 0, TOP_K_MAX))
        penalty = _clamp(_float(repetition_penalty, 1.0), 0.5, 2.0)
        seed_value = _float(seed, math.nan)
        return cls(
            system_message=str(system_message or "").strip(),
            max_new_tokens=int(_clamp(_float(max_new_tokens, DEFAULT_MAX_NEW_TOKENS), 1, max_new_tokens_cap)),
            temperature=_clamp(_float(temperature, DEFAULT_TEMPERATURE), 0.0, 2.0),
            top_p=None if top_p_value >= 1.0 else top_p_value,
            top_k=top_k_value or None,
            repetition_penalty=None if penalty == 1.0 else penalty,
            seed=None if math.isnan(seed_value) else int(_clamp(seed_value, 0, SEED_MAX)),
        )

    def widget_values(self) -> tuple[str, int, float, float, int, float, int | None]:
        """The values to put back into the widgets (None shown as the knob's "off" value)."""
        return (
            self.system_message,
            self.max_new_tokens,
            self.temperature,
            1.0 if self.top_p is None else self.top_p,
            self.top_k or 0,
            1.0 if self.repetition_penalty is None else self.repetition_penalty,
            self.seed,
        )


class PageOptions(Protocol):
    """What `page_request` reads of the page's settings (`webapp.ui.chat.ChatOptions`, clamped to the API's ranges;
    None means the API's default)."""

    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...


def page_request(options: PageOptions, messages: Sequence[Message], *, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        messages=tuple(messages),
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        repetition_penalty=options.repetition_penalty,
        seed=options.seed,
        request_id=request_id,
    )


def _float(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


# ---------------------------------------------------------------- history


def text_of(content: Any) -> str:
    """Gradio message content is a string or a list of parts; keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or "")
    if isinstance(content, list | tuple):
        return "".join(text_of(part) for part in content)
    return ""


def is_note(message: Mapping[str, Any]) -> bool:
    """Stats, errors and "stopped" markers: shown in the chat, never sent to the model."""
    metadata = message.get("metadata")
    return isinstance(metadata, Mapping) and bool(metadata.get("title"))


def note(title: str, detail: str = "", *, collapsed: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"title": title}
    if collapsed:
        metadata["status"] = "done"
    return {"role": "assistant", "content": detail, "metadata": metadata}


def messages_of_history(history: Sequence[Mapping[str, Any]]) -> list[Message]:
    """The finished turns of the chat, as the model should see them.

    Notes are skipped; a user message with no reply (it failed or was stopped before any text) is
    dropped, so roles always alternate user/assistant as chat templates such as Gemma's require;
    consecutive assistant texts are joined.
    """
    turns: list[Message] = []
    pending_user: str | None = None
    for item in history:
        if not isinstance(item, Mapping) or is_note(item):
            continue
        role, text = item.get("role"), text_of(item.get("content"))
        if not text.strip():
            continue
        if role == "user":
            pending_user = text
        elif role == "assistant":
            if pending_user is not None:
                turns += [Message("user", pending_user), Message("assistant", text)]
                pending_user = None
            elif turns:
                turns[-1] = Message("assistant", turns[-1].content + text)
    return turns


def last_user_index(history: Sequence[Mapping[str, Any]]) -> int | None:
    for index in range(len(history) - 1, -1, -1):
        if history[index].get("role") == "user" and not is_note(history[index]):
            return index
    return None


def drop_oldest_turn(turns: list[Message]) -> list[Message]:
    """Remove the oldest message and any replies that would then lead the conversation."""
    rest = turns[1:]
    while rest and rest[0].role != "user":
        rest = rest[1:]
    return rest


def clean_history(value: Any) -> History:
    """A stored or submitted chat value, reduced to well-formed text messages (anything else dropped)."""
    if not isinstance(value, list):
        return []
    cleaned: History = []
    for item in value:
        if not isinstance(item, Mapping) or item.get("role") not in ("user", "assistant"):
            continue
        message: dict[str, Any] = {"role": item["role"], "content": text_of(item.get("content"))}
        metadata = item.get("metadata")
        if isinstance(metadata, Mapping) and metadata.get("title"):
            message["metadata"] = {key: metadata[key] for key in ("title", "status") if metadata.get(key) is not None}
        cleaned.append(message)
    return cleaned


# ---------------------------------------------------------------- stats and errors


def stats_note(result: GenerationResult, lang: str) -> dict[str, Any]:
    """Tokens generated, TTFT and tokens/s, exactly as the engine measured them."""
    unavailable = tr(lang, "not_available")
    rate = format_number(lang, result.output_length / result.duration_s, 1) if result.duration_s > 0 else unavailable
    ttft_s = result.time_to_first_token_s
    ttft = tr(lang, "seconds", value=format_number(lang, ttft_s, 2)) if ttft_s is not None else unavailable
    decode_time = result.duration_s - (ttft_s or 0.0)
    decode_rate = (
        format_number(lang, (result.output_length - 1) / decode_time, 1)
        if ttft_s is not None and result.output_length > 1 and decode_time > 0
        else unavailable
    )
    values = {
        "tokens": result.output_length,
        "prompt": result.input_length,
        "ttft": ttft,
        "rate": rate,
        "decode_rate": decode_rate,
        "duration": tr(lang, "seconds", value=format_number(lang, result.duration_s, 2)),
        "finish": tr(lang, "finish_length" if result.finish_reason == "length" else "finish_stop"),
    }
    return note(tr(lang, "stats_title", **values), tr(lang, "stats_detail", **values), collapsed=True)


def error_note(error: Exception, lang: str, engine: Engine) -> dict[str, Any]:
    """A failure, said in words (never a traceback)."""
    if isinstance(error, EngineBusy):
        summary, detail = "busy", tr(lang, "busy_detail", seconds=error.retry_after_s)
    elif isinstance(error, EngineNotReady):
        keys = {"failed": "not_ready_failed", "stopping": "not_ready_stopping", "unavailable": "not_ready_unavailable"}
        key = keys.get(engine.state, "not_ready_loading")
        summary, detail = "not_ready", tr(lang, key)
    elif isinstance(error, ContextTooLong) and error.context_length > 0:  # a remote upstream gives words only
        summary = "too_long"
        detail = tr(
            lang,
            "too_long_detail",
            prompt=error.prompt_tokens,
            max_new=error.max_new_tokens,
            context=error.context_length,
        )
    elif isinstance(error, InvalidRequest):
        summary, detail = "invalid", tr(lang, "invalid_detail", detail=error)
    elif isinstance(error, GenerationFailed | InferenceError):
        summary, detail = "failed", tr(lang, "failed_detail", detail=error)
    else:
        summary, detail = "unexpected", tr(lang, "unexpected_detail")
    return note(tr(lang, "error_title", summary=tr(lang, summary)), detail)


def banner_markdown(engine: Engine, lang: str) -> str:
    head = f"## {tr(lang, 'title')}\n{tr(lang, 'subtitle')}\n\n"
    info = engine.info
    if engine.state == "failed":
        return head + tr(lang, "load_failed", reason=engine.state_reason)
    if engine.state == "stopping":
        return head + tr(lang, "stopping")
    if engine.state == "unavailable":  # ENGINE=remote and the upstream is down
        return head + tr(lang, "upstream_down", reason=engine.state_reason)
    if info is None or engine.state != "ready":
        return head + tr(lang, "loading")
    line = (
        f"**{tr(lang, 'model')}:** `{info.model_id}` · **{tr(lang, 'quantization')}:** {info.quantization} "
        f"({info.dtype}) · **{tr(lang, 'device')}:** {info.device} · "
        f"**{tr(lang, 'context')}:** {info.context_length or '?'} {tr(lang, 'tokens')}"
    )
    if info.is_embedded_demo:
        line += f"\n\n> ⚠️ {tr(lang, 'demo_note')}"
    return head + line


# ---------------------------------------------------------------- the chat function


class ChatUI:
    """The page's event handlers: plain functions of the widget values, testable without a browser."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def options(self, *values: Any) -> ChatOptions:
        return ChatOptions.from_inputs(*values, max_new_tokens_cap=self.settings.max_new_tokens_cap)

    async def respond(
        self,
        history: Any,
        system_message: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: float | None,
        lang: str,
    ) -> AsyncIterator[History]:
        """Answer the user message that ends `history`, yielding the whole chat as the reply grows.

        Ends with a stats note (or an error note); yields `history` unchanged if it does not end
        with a user message (an empty send, a retry with nothing to retry).
        """
        chat = clean_history(history)
        if not chat or chat[-1]["role"] != "user" or not chat[-1]["content"].strip():
            yield chat
            return
        options = self.options(system_message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        system = [Message("system", options.system_message)] if options.system_message else []
        past = messages_of_history(chat[:-1])
        user = Message("user", chat[-1]["content"])
        dropped = 0
        request_id = new_request_id()  # one id per reply: the engine's logs (and a remote upstream) carry it
        try:
            while True:
                try:
                    stream = await self.engine.submit(
                        page_request(options, [*system, *past, user], request_id=request_id)
                    )
                    break
                except ContextTooLong:
                    if not past:
                        raise
                    past = drop_oldest_turn(past)
                    dropped += 1
        except Exception as error:
            if not isinstance(error, InferenceError):
                logger.exception("chat page: unexpected error before generation (request %s)", request_id)
            yield [*chat, error_note(error, lang, self.engine)]
            return
        if dropped:
            chat.append(note(tr(lang, "trimmed_title", count=dropped), tr(lang, "trimmed_detail")))
        reply: dict[str, Any] = {"role": "assistant", "content": ""}
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    if not reply["content"]:
                        chat.append(reply)
                    reply["content"] += event.text
                    yield chat
                elif isinstance(event, GenerationResult):
                    chat.append(stats_note(event, lang))
                    yield chat
        except Exception as error:
            if not isinstance(error, InferenceError):
                logger.exception("chat page: unexpected error while generating (request %s)", request_id)
            chat.append(error_note(error, lang, self.engine))
            yield chat
        finally:
            # Leaving early (Stop, a closed tab) ends up here too: closing the stream frees the model.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    def add_user_message(message: str, history: Any) -> tuple[str, History]:
        """Show the user's message at once and empty the textbox.

        A blank message raises a silent error, which ends the event chain before any generation.
        """
        if not message or not message.strip():
            raise gr.Error("empty message", visible=False, print_exception=False)
        return "", [*clean_history(history), {"role": "user", "content": message}]

    @staticmethod
    def prepare_retry(history: Any) -> History:
        """Keep the chat up to the last user message, whose reply is then generated again."""
        chat = clean_history(history)
        index = last_user_index(chat)
        return chat if index is None else chat[: index + 1]

    @staticmethod
    def undo(history: Any, message: str) -> tuple[History, str]:
        """Remove the last user message and everything after it; put its text back in the textbox."""
        chat = clean_history(history)
        index = last_user_index(chat)
        if index is None:
            return chat, message
        return chat[:index], chat[index]["content"]

    @staticmethod
    def mark_stopped(history: Any, lang: str) -> History:
        """After Stop: mark a reply that was cut off (a reply that had already finished is left alone)."""
        chat = clean_history(history)
        if chat and not is_note(chat[-1]):
            chat.append(note(tr(lang, "stopped_title"), tr(lang, "stopped_detail")))
        return chat

    def restore(self, saved_chat: Any, saved_prefs: Any) -> tuple[Any, ...]:
        """On page load: the conversation, language and settings stored in this browser.

        The message box stays disabled until this has run, so a message typed at once is not wiped
        by the stored conversation arriving just after it.
        """
        prefs = saved_prefs if isinstance(saved_prefs, Mapping) else {}
        lang = language_of(prefs.get("lang"))
        stored = prefs.get("options") if isinstance(prefs.get("options"), Mapping) else {}
        defaults = self.default_options()
        options = self.options(
            stored.get("system_message", defaults.system_message),
            stored.get("max_new_tokens", defaults.max_new_tokens),
            stored.get("temperature", defaults.temperature),
            stored.get("top_p", defaults.top_p),
            stored.get("top_k", defaults.top_k),
            stored.get("repetition_penalty", defaults.repetition_penalty),
            stored.get("seed", defaults.seed),
        )
        return (
            clean_history(saved_chat),
            lang,
            *options.widget_values(),
            banner_markdown(self.engine, lang),
            gr.Timer(active=self.engine.state in ("loading", "unavailable")),
            gr.update(interactive=True),  # the message box: usable once the stored chat is in place
            gr.update(interactive=True),  # the send button
        )

    def default_options(self) -> ChatOptions:
        return ChatOptions(
            system_message=self.settings.chat_system_message,
            max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, self.settings.max_new_tokens_cap),
        )

    def refresh_banner(self, lang: str) -> tuple[str, gr.Timer]:
        """While the model loads (or a remote upstream is down), the page polls this; polling stops after."""
        return banner_markdown(self.engine, lang), gr.Timer(active=self.engine.state in ("loading", "unavailable"))

    @staticmethod
    def busy() -> tuple[Any, ...]:
        """While a reply streams: Send becomes Stop; the message box, Retry, Undo and Clear wait.

        Outputs: send, stop, message, retry, undo, clear.
        """
        return gr.update(visible=False), gr.update(visible=True), *[gr.update(interactive=False)] * 4

    @staticmethod
    def idle() -> tuple[Any, ...]:
        return gr.update(visible=True), gr.update(visible=False), *[gr.update(interactive=True)] * 4
