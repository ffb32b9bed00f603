"""The page's one documented API endpoint, `/chat`, for `gradio_client` (the Hugging Face Spaces "Use via API"):

    from gradio_client import Client
    Client("http://localhost:8000/").predict("Halo!", api_name="/chat")  # -> the reply text

Inputs: `message`, then optional `system_message` (default: CHAT_SYSTEM_MESSAGE; "" for none), `max_new_tokens`
(default min(256, MAX_NEW_TOKENS_CAP)) and `temperature` (default 0.7). One message, no history: a client that
wants a conversation uses /v1 or /api/v1. It runs on the page's engine through `page_request` (a fresh request id
per call) and is guarded like the page: public unless GRADIO_AUTH is set, then `Client(url, auth=(user, pw))`.
A bad input or an engine error is a `gr.Error` with the API's words (gradio_client raises it as `AppError`).

(No `from __future__ import annotations` here: `gr.api` reads the endpoint's types from its real annotations.)
"""

import logging
from collections.abc import Awaitable, Callable

import gradio as gr

from inference import Engine, InferenceError, Message, TextDelta
from webapp.api.fields import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    check_conversation_limits,
    check_max_new_tokens,
)
from webapp.errors import BadRequest, error_status
from webapp.middleware.observability import new_request_id
from webapp.settings import Settings
from webapp.ui.chat import ChatOptions, page_request

logger = logging.getLogger(__name__)

API_NAME = "chat"  # gradio_client's api_name="/chat"
TEMPERATURE_MAX = 2.0


def chat_endpoint(engine: Engine, settings: Settings) -> Callable[..., Awaitable[str]]:
    """The `/chat` function, with the operator's defaults in its signature (gradio_client shows and fills them)."""
    default_system_message = settings.chat_system_message
    default_max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_cap)

    async def chat(
        message: str,
        system_message: str = default_system_message,
        max_new_tokens: int = default_max_new_tokens,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> str:
        """One reply of the chat model to `message`, as text (no history: use /v1 or /api/v1 for conversations).

        Args:
            message: the user's message.
            system_message: instructions for the model; "" for none.
            max_new_tokens: longest reply, in tokens (at most MAX_NEW_TOKENS_CAP).
            temperature: 0 always picks the most likely token; up to 2.
        """
        request_id = new_request_id()
        try:
            options = _options(settings, message, system_message, max_new_tokens, temperature)
            system = [Message("system", options.system_message)] if options.system_message else []
            request = page_request(options, [*system, Message("user", message)], request_id=request_id)
            stream = await engine.submit(request)
        except (BadRequest, InferenceError) as error:
            raise gr.Error(error_status(error)[1], print_exception=False) from None
        except Exception:
            logger.exception("chat endpoint: unexpected error before generation (request %s)", request_id)
            raise gr.Error("unexpected error (logged on the server)", print_exception=False) from None
        parts: list[str] = []
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
        except InferenceError as error:
            raise gr.Error(error_status(error)[1], print_exception=False) from None
        except Exception:
            logger.exception("chat endpoint: unexpected error while generating (request %s)", request_id)
            raise gr.Error("unexpected error (logged on the server)", print_exception=False) from None
        finally:
            aclose = getattr(stream, "aclose", None)  # a client that leaves frees the model at once
            if aclose is not None:
                await aclose()
        return "".join(parts)

    return chat


def _options(
    settings: Settings, message: object, system_message: object, max_new_tokens: object, temperature: object
) -> ChatOptions:
    """The inputs checked as the API checks them: a 400-style message naming the field, never a silent clamp."""
    if not isinstance(message, str) or not message.strip():
        raise BadRequest("message: must be a non-empty string", param="message")
    if system_message is None:
        system_message = ""
    if not isinstance(system_message, str):
        raise BadRequest("system_message: must be a string", param="system_message")
    if isinstance(max_new_tokens, float) and max_new_tokens.is_integer():
        max_new_tokens = int(max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadRequest("max_new_tokens: must be a whole number of at least 1", param="max_new_tokens")
    check_max_new_tokens(max_new_tokens, settings.max_new_tokens_cap)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0.0 <= temperature <= TEMPERATURE_MAX
    ):
        raise BadRequest(f"temperature: must be a number from 0 to {TEMPERATURE_MAX:g}", param="temperature")
    check_conversation_limits(
        settings,
        history_messages=0,
        total_chars=len(message) + len(system_message),
        history_field="message",
        text_field="message",
    )
    return ChatOptions(
        system_message=system_message.strip(),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
    )
