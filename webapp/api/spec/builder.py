"""The documented API's body -> `GenerationRequest`: the conversation, the limits, the sampling knobs."""

from __future__ import annotations

from inference import GenerationRequest, Message
from webapp.api.fields import check_conversation_limits, check_max_new_tokens
from webapp.api.spec.protocol import ChatMessage, TextGenerationRequest
from webapp.settings import Settings


def _conversation(body: TextGenerationRequest, system_message: str | None) -> list[ChatMessage]:
    """System message (if any) + history + the new user text: what the model is asked to continue."""
    messages: list[ChatMessage] = []
    if system_message:
        messages.append(ChatMessage(role="system", content=system_message))
    messages += body.conversation_history or []
    messages.append(ChatMessage(role="user", content=body.text))
    return messages


def spec_request(
    body: TextGenerationRequest, system_message: str | None, settings: Settings, *, request_id: str
) -> tuple[GenerationRequest, list[ChatMessage]]:
    """The request for the engine, and the conversation it continues (the response's `full_conversation`)."""
    conversation = _conversation(body, system_message)
    history = body.conversation_history or []
    check_conversation_limits(
        settings,
        history_messages=len(history),
        # What the client sent; the automatic system message of /chat is the operator's and not counted.
        total_chars=len(body.text) + len(body.system_message or "") + sum(len(m.content) for m in history),
        history_field="conversation_history",
        text_field="text",
    )
    cap = settings.max_new_tokens_cap
    # An explicit value above the cap is an error; the default is lowered to a cap below it.
    max_new_tokens = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else min(body.max_new_tokens, cap)
    check_max_new_tokens(max_new_tokens, cap)
    generation = GenerationRequest(
        messages=tuple(Message(role=m.role, content=m.content) for m in conversation),
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        request_id=request_id,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        min_p=body.min_p,
    )
    return generation, conversation
