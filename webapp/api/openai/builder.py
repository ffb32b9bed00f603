"""An OpenAI body -> `GenerationRequest`(s): refused fields, limits, sampling, tools and response_format resolved once."""

from __future__ import annotations

from typing import Any

from inference import GenerationRequest
from webapp.api.fields import DEFAULT_MAX_NEW_TOKENS
from webapp.api.limits import check_conversation_limits, check_max_new_tokens
from webapp.api.openai.completions_protocol import CompletionRequest
from webapp.api.openai.protocol import OpenAIChatCompletionRequest
from webapp.api.openai.response_format import parse_response_format
from webapp.api.openai.tools import ToolUse
from webapp.errors import BadRequest
from webapp.settings import Settings


def _check_openai_body(body: OpenAIChatCompletionRequest | CompletionRequest) -> None:
    """What both OpenAI routes refuse before any work: fields set to what this server does not do."""
    refused = body.unsupported()
    if refused is not None:
        field, reason = refused
        raise BadRequest(f"{field}: {reason}", param=field)
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options: only allowed with stream=true", param="stream_options")


def _openai_sampling(body: OpenAIChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The sampling knobs both OpenAI routes take, as GenerationRequest fields."""
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "stop": tuple(body.stop_list()),
    }


def openai_request(body: OpenAIChatCompletionRequest, settings: Settings, *, request_id: str) -> GenerationRequest:
    _check_openai_body(body)
    tools = ToolUse(body)  # tools, tool_choice and the history's tool turns (webapp.api.openai.tools)
    messages = tools.messages()
    check_conversation_limits(
        settings,
        history_messages=len(body.messages) - 1,
        total_chars=sum(
            len(m.text()) + sum(len(c.function.arguments) for c in m.tool_calls or []) for m in body.messages
        ),
        history_field="messages",
        text_field="messages",
    )
    cap = settings.max_new_tokens_cap
    for field in ("max_tokens", "max_completion_tokens"):  # each explicit value is checked, even the unused one
        value = getattr(body, field)
        if value is not None:
            check_max_new_tokens(value, cap, field)
    # max_completion_tokens wins over the older max_tokens; the default is lowered to a cap below it.
    max_new_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_NEW_TOKENS, cap)
    response_format = parse_response_format(body.response_format)
    forced_call = tools.response_format()  # tool_choice `required` or a named function: the reply is the call
    if forced_call is not None and response_format is not None:
        raise BadRequest(
            "response_format: a JSON response_format cannot be combined with a tool_choice that forces a call "
            "(the reply is the call)",
            param="response_format",
        )
    return GenerationRequest(
        messages=messages,
        max_new_tokens=max_new_tokens,
        request_id=request_id,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        response_format=forced_call or response_format,
        **_openai_sampling(body),
    )


def completion_request(body: CompletionRequest, settings: Settings, *, request_id: str) -> list[GenerationRequest]:
    """One raw-prompt request per prompt of the list (the batched engine runs them together)."""
    _check_openai_body(body)
    prompts = body.prompts()
    total_chars = sum(len(p) for p in prompts)
    if total_chars > settings.max_total_chars:
        raise BadRequest(
            f"prompt: the prompts hold {total_chars} characters together, above the limit of "
            f"{settings.max_total_chars} (MAX_TOTAL_CHARS)",
            param="prompt",
        )
    cap = settings.max_new_tokens_cap
    if "max_tokens" in body.model_fields_set:
        check_max_new_tokens(body.max_tokens, cap, "max_tokens")
    max_new_tokens = min(body.max_tokens, cap)  # the default is lowered to a cap below it
    response_format = parse_response_format(body.response_format)
    return [
        GenerationRequest(
            messages=(),
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            logprobs=body.logprobs,
            response_format=response_format,
            request_id=request_id,
            **_openai_sampling(body),
        )
        for prompt in prompts
    ]
