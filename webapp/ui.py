"""The Gradio chat page at `/`, streaming from the same engine object as the API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from inference import (
    ContextTooLong,
    Engine,
    EngineBusy,
    EngineNotReady,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    Message,
    TextDelta,
)
from inference.settings import Settings
from webapp.schemas import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE

logger = logging.getLogger(__name__)

EXAMPLES = [
    "Sopo wae sing ana ing Punakawan?",
    "Ceritakne babagan sejarah Jawa",
    "Apa saja tempat wisata menarik di Bandung?",
    "Jelaskan cara membuat nasi goreng yang enak.",
]


def _text_of(content: Any) -> str:
    """Gradio history content is a string or a list of parts; keep the text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_text_of(part) for part in content)
    return str(content or "")


def history_messages(history: list[dict[str, Any]]) -> list[Message]:
    messages: list[Message] = []
    for item in history:
        role, text = item.get("role"), _text_of(item.get("content"))
        if role in ("user", "assistant") and text:
            messages.append(Message(role=role, content=text))
    return messages


def _drop_oldest_turn(history: list[Message]) -> list[Message]:
    """Remove the oldest message and any assistant replies that would then lead the history."""
    rest = history[1:]
    while rest and rest[0].role != "user":
        rest = rest[1:]
    return rest


class ChatHandler:
    """The page's chat function: trims over-long history, streams deltas, says failures in words."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    async def __call__(
        self,
        message: str,
        history: list[dict[str, Any]],
        system_message: str,
        max_new_tokens: float,
        temperature: float,
    ) -> AsyncIterator[str]:
        if not message or not message.strip():
            raise gr.Error("Pesan kosong / empty message")
        past = history_messages(history)
        system = [Message("system", system_message.strip())] if system_message and system_message.strip() else []
        max_new = max(1, min(int(max_new_tokens), self.settings.max_new_tokens_cap))
        dropped = 0
        while True:
            request = GenerationRequest(
                messages=(*system, *past, Message("user", message)),
                max_new_tokens=max_new,
                temperature=float(temperature),
            )
            try:
                stream = await self.engine.submit(request)
                break
            except ContextTooLong as error:
                if not past:
                    raise gr.Error(f"Pesan terlalu panjang / message too long: {error}") from None
                past = _drop_oldest_turn(past)
                dropped += 1
            except EngineNotReady as error:
                raise gr.Error(f"Model sedang dimuat, coba lagi sebentar / model not ready: {error}") from None
            except EngineBusy:
                raise gr.Error(
                    "Server sedang sibuk, coba lagi sebentar / the server is busy, try again shortly"
                ) from None
            except InvalidRequest as error:
                raise gr.Error(str(error)) from None
            except InferenceError as error:  # e.g. ENGINE=remote and the upstream failed
                raise gr.Error(f"Gagal membuat jawaban / generation failed: {error}") from None
        if dropped:
            gr.Warning(f"{dropped} pesan terlama dihapus agar muat di konteks model / oldest messages dropped to fit")
        text = ""
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    text += event.text
                    yield text
        except InferenceError as error:
            raise gr.Error(f"Gagal membuat jawaban / generation failed: {error}") from None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]


def build_ui(engine: Engine, settings: Settings) -> gr.Blocks:
    handler = ChatHandler(engine, settings)
    with gr.Blocks(title="Sahabat-AI Chat") as demo:
        banner = gr.Markdown(_banner(engine))
        gr.ChatInterface(
            fn=handler,
            additional_inputs=[
                gr.Textbox(value="", label="Pesan sistem / system message", lines=2),
                gr.Slider(1, settings.max_new_tokens_cap, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"),
                gr.Slider(0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature"),
            ],
            additional_inputs_accordion=gr.Accordion("Pengaturan / settings", open=False),
            examples=[[e, "", DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE] for e in EXAMPLES],
            cache_examples=False,
            concurrency_limit=None,  # the engine queues; Gradio's default of 1 would serialise users twice
        )
        demo.load(lambda: _banner(engine), outputs=banner)
    return demo


def _banner(engine: Engine) -> str:
    info = engine.info
    if info is None:
        return f"## Sahabat-AI Chat\n**Model:** loading… ({engine.state_reason})"
    note = (
        "\n\n> Demo mode: no GPU here, so the small embedded model answers instead of sahabat-ai."
        if info.is_embedded_demo
        else ""
    )
    return (
        f"## Sahabat-AI Chat\n**Model:** `{info.model_id}` · quantization: {info.quantization} · "
        f"dtype: {info.dtype} · device: {info.device}{note}"
    )
