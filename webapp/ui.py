"""The Gradio chat page at `/`, streaming from the same engine object as the API.

A custom `gr.Blocks` page (ChatInterface has no room for per-reply stats or a language switch):

- chat: streaming replies, stop, retry, undo, clear, copy buttons; the conversation, the language and
  the settings live in the browser (`gr.BrowserState`, localStorage), so a reload keeps them;
- settings: system message and every sampling knob of the API, with the API's defaults;
- Bahasa Indonesia first, English on a switch;
- under each reply, honest stats from the engine's `GenerationResult`; failures and busy states are
  notes in the chat, in words, never a traceback.

Notes (stats, errors, "stopped") are assistant messages with a `metadata.title`; they are shown but
never sent back to the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr
from fastapi import FastAPI

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
from webapp.schemas import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from webapp.settings import Settings

logger = logging.getLogger(__name__)

History = list[dict[str, Any]]

LANGUAGES = ("id", "en")
DEFAULT_LANGUAGE = "id"
LANGUAGE_CHOICES = [("Bahasa Indonesia", "id"), ("English", "en")]

# Example prompts in Indonesian, Javanese and Sundanese; the spec's three are among them.
EXAMPLES: list[tuple[str, str]] = [
    ("jv", "Sopo wae sing ana ing Punakawan?"),
    ("jv", "Ceritakne babagan sejarah Jawa"),
    ("jv", "Jelasne luwih rinci"),
    ("id", "Apa saja tempat wisata menarik di Bandung?"),
    ("id", "Jelaskan cara membuat nasi goreng yang enak."),
    ("su", "Naon waé kadaharan has Sunda?"),
    ("su", "Jelaskeun naon ari wayang golék."),
]
EXAMPLE_LANGUAGE_NAMES = {"id": "Indonesia", "jv": "Jawa", "su": "Sunda"}

# The conversation and the preferences are kept in the browser's localStorage under fixed keys, so
# they survive a reload and a server restart. The "secret" only obfuscates: the browser holds it too.
CHAT_STORAGE_KEY = "sahabat-ai-chat-v1"
PREFS_STORAGE_KEY = "sahabat-ai-prefs-v1"
STORAGE_SECRET = "sahabat-ai-page"  # not a credential; see above

TOP_K_MAX = 200
SEED_MAX = 2**32 - 1
LOADING_REFRESH_S = 2.0

TEXTS: dict[str, dict[str, str]] = {
    "id": {
        "title": "Sahabat-AI Chat",
        "subtitle": "Asisten percakapan berbahasa Indonesia, Jawa dan Sunda.",
        "model": "Model",
        "quantization": "Kuantisasi",
        "device": "Perangkat",
        "context": "Konteks",
        "tokens": "token",
        "demo_note": (
            "**Mode demo:** di mesin ini tidak ada GPU, jadi yang menjawab adalah model kecil bawaan "
            "(SmolLM2-135M), **bukan sahabat-ai**. Jawabannya jauh lebih lemah, terutama dalam bahasa "
            "Indonesia, Jawa dan Sunda."
        ),
        "loading": "⏳ **Model sedang dimuat…** Halaman ini diperbarui otomatis setelah model siap.",
        "load_failed": "❌ **Model gagal dimuat.** Hubungi pengelola layanan. Detail: {reason}",
        "stopping": "⏸ **Layanan sedang dimatikan.** Coba lagi nanti.",
        "upstream_down": (
            "⏳ **Server model belum bisa dihubungi.** Halaman ini diperbarui otomatis setelah tersambung. "
            "Detail: {reason}"
        ),
        "language": "Bahasa / Language",
        "chatbot": "Percakapan",
        "placeholder": "Tulis pesan di bawah atau pilih salah satu contoh. Jawaban muncul kata demi kata.",
        "message": "Pesan",
        "message_placeholder": "Tulis pesan… (Enter untuk kirim, Shift+Enter untuk baris baru)",
        "send": "Kirim",
        "stop": "⏹ Berhenti",
        "retry": "🔄 Coba lagi",
        "undo": "↩️ Urungkan",
        "clear": "🗑️ Hapus percakapan",
        "examples": "Contoh pertanyaan (klik untuk memakai)",
        "settings": "⚙️ Pengaturan",
        "system": "Pesan sistem",
        "system_info": "Instruksi untuk model di awal percakapan. Kosongkan untuk tanpa pesan sistem.",
        "max_new_tokens": "Maks. token baru",
        "max_new_tokens_info": "Panjang maksimum jawaban, dalam token.",
        "temperature": "Temperatur",
        "temperature_info": "0 = selalu memilih kata paling mungkin; makin tinggi makin acak.",
        "top_p": "Top-p",
        "top_p_info": "Ambil sampel dari kata-kata teratas yang total peluangnya p. 1 = mati.",
        "top_k": "Top-k",
        "top_k_info": "Ambil sampel hanya dari k kata paling mungkin. 0 = mati.",
        "repetition_penalty": "Penalti pengulangan",
        "repetition_penalty_info": "Di atas 1 mengurangi pengulangan. 1 = mati.",
        "seed": "Seed",
        "seed_info": "Seed dan pesan yang sama memberi jawaban yang sama. Kosongkan untuk acak.",
        "footer": (
            "Percakapan dan pengaturan disimpan di peramban ini saja (tidak di server). "
            "Jawaban model bisa keliru; periksa kembali informasi penting."
        ),
        "stats_title": "📊 {tokens} token · TTFT {ttft} · {rate} token/dtk",
        "stats_detail": (
            "- Token dihasilkan: **{tokens}** (token prompt: {prompt})\n"
            "- Waktu sampai token pertama (TTFT): **{ttft}**\n"
            "- Durasi total: {duration}; kecepatan rata-rata {rate} token/dtk "
            "(setelah token pertama: {decode_rate} token/dtk)\n"
            "- Selesai karena: {finish}"
        ),
        "finish_stop": "model selesai menjawab",
        "finish_length": "batas maks. token baru tercapai",
        "seconds": "{value} dtk",
        "not_available": "t/a",
        "stopped_title": "⏹ Dihentikan",
        "stopped_detail": "Jawaban dihentikan sebelum selesai; statistik tidak tersedia.",
        "trimmed_title": "ℹ️ {count} giliran terlama tidak dikirim ke model",
        "trimmed_detail": "Percakapan terlalu panjang untuk konteks model, jadi giliran terlama dilewati.",
        "error_title": "⚠️ {summary}",
        "busy": "Server sedang sibuk",
        "busy_detail": "Terlalu banyak permintaan saat ini. Coba lagi dalam {seconds} detik (tombol Coba lagi).",
        "not_ready": "Model belum siap",
        "not_ready_loading": "Model sedang dimuat. Tunggu sebentar lalu tekan Coba lagi.",
        "not_ready_failed": "Model gagal dimuat, jadi layanan belum bisa menjawab. Hubungi pengelola layanan.",
        "not_ready_stopping": "Layanan sedang dimatikan. Coba lagi nanti.",
        "not_ready_unavailable": "Server model belum bisa dihubungi. Tunggu sebentar lalu tekan Coba lagi.",
        "too_long": "Pesan terlalu panjang",
        "too_long_detail": (
            "Pesan ini ({prompt} token) ditambah maks. token baru ({max_new}) melebihi konteks model "
            "({context} token). Persingkat pesan atau kurangi maks. token baru."
        ),
        "invalid": "Permintaan tidak valid",
        "invalid_detail": "Model menolak permintaan ini: {detail}",
        "failed": "Gagal membuat jawaban",
        "failed_detail": "Terjadi kesalahan di server saat membuat jawaban ({detail}). Tekan Coba lagi.",
        "unexpected": "Terjadi kesalahan tak terduga",
        "unexpected_detail": "Kesalahan ini sudah dicatat di server. Tekan Coba lagi.",
    },
    "en": {
        "title": "Sahabat-AI Chat",
        "subtitle": "A chat assistant for Indonesian, Javanese and Sundanese.",
        "model": "Model",
        "quantization": "Quantization",
        "device": "Device",
        "context": "Context",
        "tokens": "tokens",
        "demo_note": (
            "**Demo mode:** there is no GPU on this machine, so the small embedded model (SmolLM2-135M) "
            "answers, **not sahabat-ai**. Its answers are much weaker, especially in Indonesian, "
            "Javanese and Sundanese."
        ),
        "loading": "⏳ **Loading the model…** This page updates by itself once the model is ready.",
        "load_failed": "❌ **The model failed to load.** Contact the service operator. Details: {reason}",
        "stopping": "⏸ **The service is shutting down.** Try again later.",
        "upstream_down": (
            "⏳ **The model server cannot be reached.** This page updates by itself once it is back. Details: {reason}"
        ),
        "language": "Bahasa / Language",
        "chatbot": "Conversation",
        "placeholder": "Type a message below or pick an example. The reply appears word by word.",
        "message": "Message",
        "message_placeholder": "Type a message… (Enter to send, Shift+Enter for a new line)",
        "send": "Send",
        "stop": "⏹ Stop",
        "retry": "🔄 Retry",
        "undo": "↩️ Undo",
        "clear": "🗑️ Clear conversation",
        "examples": "Example questions (click to use)",
        "settings": "⚙️ Settings",
        "system": "System message",
        "system_info": "Instructions for the model at the start of the conversation. Empty for none.",
        "max_new_tokens": "Max new tokens",
        "max_new_tokens_info": "Longest reply, in tokens.",
        "temperature": "Temperature",
        "temperature_info": "0 always picks the most likely word; higher is more random.",
        "top_p": "Top-p",
        "top_p_info": "Sample from the top words whose probabilities add up to p. 1 = off.",
        "top_k": "Top-k",
        "top_k_info": "Sample only from the k most likely words. 0 = off.",
        "repetition_penalty": "Repetition penalty",
        "repetition_penalty_info": "Above 1 discourages repeats. 1 = off.",
        "seed": "Seed",
        "seed_info": "The same seed and message give the same reply. Empty for random.",
        "footer": (
            "The conversation and settings are stored in this browser only (not on the server). "
            "The model can be wrong; double-check important information."
        ),
        "stats_title": "📊 {tokens} tokens · TTFT {ttft} · {rate} tokens/s",
        "stats_detail": (
            "- Tokens generated: **{tokens}** (prompt tokens: {prompt})\n"
            "- Time to first token (TTFT): **{ttft}**\n"
            "- Total duration: {duration}; average speed {rate} tokens/s "
            "(after the first token: {decode_rate} tokens/s)\n"
            "- Finished because: {finish}"
        ),
        "finish_stop": "the model finished its answer",
        "finish_length": "the max new tokens limit was reached",
        "seconds": "{value} s",
        "not_available": "n/a",
        "stopped_title": "⏹ Stopped",
        "stopped_detail": "The reply was stopped before it finished; no stats are available.",
        "trimmed_title": "ℹ️ The {count} oldest turns were not sent to the model",
        "trimmed_detail": "The conversation is too long for the model's context, so the oldest turns were left out.",
        "error_title": "⚠️ {summary}",
        "busy": "The server is busy",
        "busy_detail": "Too many requests right now. Try again in {seconds} seconds (Retry button).",
        "not_ready": "The model is not ready",
        "not_ready_loading": "The model is still loading. Wait a moment, then press Retry.",
        "not_ready_failed": "The model failed to load, so the service cannot answer. Contact the service operator.",
        "not_ready_stopping": "The service is shutting down. Try again later.",
        "not_ready_unavailable": "The model server cannot be reached. Wait a moment, then press Retry.",
        "too_long": "The message is too long",
        "too_long_detail": (
            "This message ({prompt} tokens) plus max new tokens ({max_new}) exceeds the model's context "
            "({context} tokens). Shorten the message or lower max new tokens."
        ),
        "invalid": "Invalid request",
        "invalid_detail": "The model rejected this request: {detail}",
        "failed": "The reply could not be generated",
        "failed_detail": "The server hit an error while generating ({detail}). Press Retry.",
        "unexpected": "An unexpected error occurred",
        "unexpected_detail": "It has been logged on the server. Press Retry.",
    },
}


def language_of(value: Any) -> str:
    return value if value in LANGUAGES else DEFAULT_LANGUAGE


def tr(lang: str, key: str, **values: Any) -> str:
    text = TEXTS[language_of(lang)][key]
    return text.format(**values) if values else text


def _number(lang: str, value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.replace(".", ",") if language_of(lang) == "id" else text


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

    def request(self, messages: Sequence[Message]) -> GenerationRequest:
        return GenerationRequest(
            messages=tuple(messages),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
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


def conversation_of(history: Sequence[Mapping[str, Any]]) -> list[Message]:
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
    rate = _number(lang, result.output_length / result.duration_s, 1) if result.duration_s > 0 else unavailable
    ttft_s = result.time_to_first_token_s
    ttft = tr(lang, "seconds", value=_number(lang, ttft_s, 2)) if ttft_s is not None else unavailable
    decode_time = result.duration_s - (ttft_s or 0.0)
    decode_rate = (
        _number(lang, (result.output_length - 1) / decode_time, 1)
        if ttft_s is not None and result.output_length > 1 and decode_time > 0
        else unavailable
    )
    values = {
        "tokens": result.output_length,
        "prompt": result.input_length,
        "ttft": ttft,
        "rate": rate,
        "decode_rate": decode_rate,
        "duration": tr(lang, "seconds", value=_number(lang, result.duration_s, 2)),
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
        past = conversation_of(chat[:-1])
        user = Message("user", chat[-1]["content"])
        dropped = 0
        try:
            while True:
                try:
                    stream = await self.engine.submit(options.request([*system, *past, user]))
                    break
                except ContextTooLong:
                    if not past:
                        raise
                    past = drop_oldest_turn(past)
                    dropped += 1
        except Exception as error:
            if not isinstance(error, InferenceError):
                logger.exception("chat page: unexpected error before generation")
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
                logger.exception("chat page: unexpected error while generating")
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


def build_ui(engine: Engine, settings: Settings) -> gr.Blocks:
    ui = ChatUI(engine, settings)
    lang = DEFAULT_LANGUAGE
    defaults = ui.default_options()
    cap = settings.max_new_tokens_cap
    with gr.Blocks(title="Sahabat-AI Chat") as demo:
        saved_chat = gr.BrowserState([], storage_key=CHAT_STORAGE_KEY, secret=STORAGE_SECRET)
        saved_prefs = gr.BrowserState({}, storage_key=PREFS_STORAGE_KEY, secret=STORAGE_SECRET)
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
        timer = gr.Timer(LOADING_REFRESH_S, active=False)
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
            send = gr.Button(
                tr(lang, "send"), variant="primary", elem_id="send", scale=1, min_width=100, interactive=False
            )
            stop = gr.Button(tr(lang, "stop"), variant="stop", elem_id="stop", scale=1, min_width=100, visible=False)
        with gr.Row():
            retry = gr.Button(tr(lang, "retry"), size="sm", elem_id="retry")
            undo = gr.Button(tr(lang, "undo"), size="sm", elem_id="undo")
            clear = gr.Button(tr(lang, "clear"), size="sm", elem_id="clear")
        examples = gr.Dataset(
            components=[gr.Textbox(visible=False)],
            samples=[[text] for _, text in EXAMPLES],  # not translated: they are samples of the languages
            sample_labels=[f"{text} ({EXAMPLE_LANGUAGE_NAMES[code]})" for code, text in EXAMPLES],
            label=tr(lang, "examples"),
            elem_id="examples",
            samples_per_page=len(EXAMPLES),
        )
        with gr.Accordion(tr(lang, "settings"), open=False, elem_id="settings") as settings_panel:
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
                    0.01,
                    1.0,
                    value=1.0,
                    step=0.01,
                    label=tr(lang, "top_p"),
                    info=tr(lang, "top_p_info"),
                    elem_id="top-p",
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
        footer = gr.Markdown(tr(lang, "footer"), elem_id="footer")

        option_inputs = [system_message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]
        quick = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        respond = {
            "fn": ui.respond,
            "inputs": [chatbot, *option_inputs, language],
            "outputs": [chatbot],
            "concurrency_limit": None,  # the engine queues; Gradio's default of 1 would serialise users twice
            "api_visibility": "private",
            "show_progress": "minimal",
        }

        # The conversation is saved in the browser (localStorage) at the end of every action, by a
        # JS-only step: no server round trip. (A JS function's array result is read as one value per
        # output, hence the brackets.) Not on every chatbot change: the page's first, empty value
        # would overwrite the stored conversation before it is restored.
        save_chat = {"fn": None, "inputs": [chatbot], "outputs": [saved_chat], "js": "(history) => [history]", **quick}

        controls = [send, stop, message, retry, undo, clear]  # see ChatUI.busy

        # Send: show the message at once, then stream the reply.
        sent = gr.on([message.submit, send.click], ui.add_user_message, [message, chatbot], [message, chatbot], **quick)
        sent_reply = sent.success(**save_chat).then(ui.busy, None, controls, **quick).then(**respond)
        sent_reply.then(ui.idle, None, controls, **quick).then(**save_chat)

        # Retry: drop the last reply (and its notes) and generate it again.
        retried = gr.on([retry.click, chatbot.retry], ui.prepare_retry, [chatbot], [chatbot], **quick)
        retried_reply = retried.then(ui.busy, None, controls, **quick).then(**respond)
        retried_reply.then(ui.idle, None, controls, **quick).then(**save_chat)

        # Stop cancels the streaming event; closing its generator cancels the generation in the engine.
        stop.click(None, None, None, cancels=[sent_reply, retried_reply], **quick).then(
            ui.mark_stopped, [chatbot, language], [chatbot], **quick
        ).then(ui.idle, None, controls, **quick).then(**save_chat)

        gr.on([undo.click, chatbot.undo], ui.undo, [chatbot, message], [chatbot, message], **quick).then(**save_chat)
        gr.on([clear.click, chatbot.clear], lambda: [], None, [chatbot], **quick).then(**save_chat)
        examples.click(lambda sample: sample[0], [examples], [message], **quick)

        # Language and settings: saved when the user changes them (`.input`, not `.change`, for the
        # same reason as above).
        gr.on(
            [language.input, *(component.input for component in option_inputs)],
            None,
            [language, *option_inputs],
            [saved_prefs],
            js=(
                "(lang, system_message, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) => "
                "[{lang, options: {system_message, max_new_tokens, temperature, top_p, top_k, "
                "repetition_penalty, seed}}]"
            ),
            **quick,
        )

        relabelled = [
            banner,
            chatbot,
            message,
            send,
            stop,
            retry,
            undo,
            clear,
            examples,
            settings_panel,
            system_message,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
            footer,
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

        language.change(relabel, [language], relabelled, **quick)
        timer.tick(ui.refresh_banner, [language], [banner, timer], **quick)
        demo.load(
            ui.restore,
            [saved_chat, saved_prefs],
            [chatbot, language, *option_inputs, banner, timer, message, send],
            **quick,
        )
    return demo


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


__all__ = ["ChatOptions", "ChatUI", "build_ui", "mount_ui"]
