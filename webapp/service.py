"""Translation between the documented API's bodies and the engine seam (no HTTP here)."""

from __future__ import annotations

from inference import Engine, GenerationRequest, GenerationResult, Message
from webapp.errors import BadRequest
from webapp.observability import current_request_id
from webapp.schemas import ChatMessage, GenerateTextResponse, TextGenerationRequest


def conversation_of(body: TextGenerationRequest, system_message: str | None) -> list[ChatMessage]:
    """System message (if any) + history + the new user text: what the model is asked to continue."""
    messages: list[ChatMessage] = []
    if system_message:
        messages.append(ChatMessage(role="system", content=system_message))
    messages += body.conversation_history or []
    messages.append(ChatMessage(role="user", content=body.text))
    return messages


def generation_request(
    body: TextGenerationRequest, conversation: list[ChatMessage], max_new_tokens_cap: int, request_id: str = ""
) -> GenerationRequest:
    if body.max_new_tokens > max_new_tokens_cap:
        raise BadRequest(f"max_new_tokens: must be at most {max_new_tokens_cap} (MAX_NEW_TOKENS_CAP)")
    return GenerationRequest(
        messages=tuple(Message(role=m.role, content=m.content) for m in conversation),
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        request_id=request_id or current_request_id(),
    )


def text_response(conversation: list[ChatMessage], result: GenerationResult, model: str) -> GenerateTextResponse:
    return GenerateTextResponse(
        generated_text=result.text,
        full_conversation=[*conversation, ChatMessage(role="assistant", content=result.text)],
        model=model,
        input_length=result.input_length,
        output_length=result.output_length,
    )


async def respond(
    engine: Engine, body: TextGenerationRequest, system_message: str | None, max_new_tokens_cap: int
) -> GenerateTextResponse:
    conversation = conversation_of(body, system_message)
    request = generation_request(body, conversation, max_new_tokens_cap)
    info = engine.ensure_ready()
    result = await engine.generate(request)
    return text_response(conversation, result, info.model_id)
