"""Parsed bodies to `GenerationRequest`s: one builder per API family, each carrying the request id.

- `spec_request`: the documented `/api/v1` routes (generate-text and chat);
- `openai_request`: the OpenAI-compatible `/v1/chat/completions`;
- `completion_request`: the OpenAI-compatible legacy `/v1/completions` (raw prompts, one request per prompt);
- `page_request`: the chat page (its settings panel's values, already clamped by `ui.chat.ChatOptions`).

The request id is the HTTP request's (`observability.current_request_id()`) for the API routes, and a fresh one
(`observability.new_request_id()`) for each reply of the page: the engine's failure logs and the remote engine's
`X-Request-Id` carry it. The checks the builders share (the MAX_NEW_TOKENS_CAP, the conversation limits) are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from inference import GenerationRequest, Message
from webapp.completions_schemas import CompletionRequest
from webapp.errors import BadRequest
from webapp.limits import check_conversation_limits
from webapp.response_format import parse_response_format
from webapp.schemas import DEFAULT_MAX_NEW_TOKENS, ChatMessage, OpenAIChatCompletionRequest, TextGenerationRequest
from webapp.settings import Settings
from webapp.tool_calls import ToolUse


def conversation_of(body: TextGenerationRequest, system_message: str | None) -> list[ChatMessage]:
    """System message (if any) + history + the new user text: what the model is asked to continue."""
    messages: list[ChatMessage] = []
    if system_message:
        messages.append(ChatMessage(role="system", content=system_message))
    messages += body.conversation_history or []
    messages.append(ChatMessage(role="user", content=body.text))
    return messages


def check_max_new_tokens(value: int, cap: int, field: str = "max_new_tokens") -> None:
    if value > cap:
        raise BadRequest(f"{field}: must be at most {cap} (MAX_NEW_TOKENS_CAP)", param=field)


def spec_request(
    body: TextGenerationRequest, conversation: list[ChatMessage], settings: Settings, *, request_id: str
) -> GenerationRequest:
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
    return GenerationRequest(
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
    tools = ToolUse(body)  # tools, tool_choice and the history's tool turns (webapp.tool_calls)
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
