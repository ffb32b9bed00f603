"""What the remote engine says to and reads from an OpenAI-compatible upstream: the request body, the chunks'
logprobs and stop sequence, the upstream's error text, and its URL as logs show it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai

from inference.sampling.grammar import openai_response_format
from inference.text.prompt import fold_system_messages
from inference.types import GenerationRequest, TokenLogprob, UpstreamError


def redact_url(url: str) -> str:
    """The URL without credentials or query, for logs, reasons and the page banner."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def chat_completion_body(request: GenerationRequest, model: str, fold: bool) -> dict[str, Any]:
    """The streamed `chat/completions` body for `request` (`completions` for a raw prompt); `fold`: system text
    folded into user turns."""
    if request.prompt is not None:
        source: dict[str, Any] = {"prompt": request.prompt}
    elif fold:
        source = {"messages": fold_system_messages(request.messages)}
    else:
        source = {"messages": [{"role": m.role, "content": m.content} for m in request.messages]}
    body: dict[str, Any] = {
        "model": model,
        **source,
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    optional = {
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": list(request.stop) or None,
        "top_k": request.top_k,  # an extension vLLM and this service take; sent only when asked for
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty or None,
        "frequency_penalty": request.frequency_penalty or None,
        "min_p": request.min_p,  # an extension, as top_k
    }
    if request.logprobs is not None:
        optional.update(logprobs=True, top_logprobs=request.logprobs)
    body.update({name: value for name, value in optional.items() if value is not None})
    if request.response_format is not None:  # vLLM and llama.cpp's server enforce it themselves
        body["response_format"] = openai_response_format(request.response_format)
    return body


def upstream_logprobs(choice: dict[str, Any]) -> list[TokenLogprob]:
    """The tokens of an upstream chunk's `choices[0].logprobs.content` (OpenAI's shape), as TokenLogprobs."""
    content = (choice.get("logprobs") or {}).get("content") or []
    tokens = []
    for item in content:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            continue
        top = tuple(
            (alt["token"], float(alt.get("logprob", 0.0)))
            for alt in item.get("top_logprobs") or []
            if isinstance(alt, dict) and isinstance(alt.get("token"), str)
        )
        tokens.append(TokenLogprob(item["token"], float(item.get("logprob", 0.0)), top))
    return tokens


def upstream_message(error: openai.APIError) -> str:
    """The upstream's own error text.

    OpenAI-shaped `{"error": {"message"}}` (the client unwraps it), vLLM's `{"message"}`, TGI's `{"error": "..."}`.
    """
    body = error.body
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    if isinstance(body, str) and body:
        return body
    return error.message


def upstream_stop_sequence(choice: dict[str, Any], stops: tuple[str, ...]) -> str | None:
    """The stop sequence a finished chunk says the reply ended on: vLLM's `stop_reason` (the matched string, or the
    terminator's id); None where the upstream does not say (OpenAI's shape has no such field)."""
    reason = choice.get("stop_reason")
    return reason if isinstance(reason, str) and reason in stops else None


async def prompt_tokens_of(upstream: Any) -> int:
    """The `usage.prompt_tokens` of an opened upstream stream (closed at the end): the remote engine's count."""
    try:
        async for chunk in upstream:
            usage = chunk.get("usage") if isinstance(chunk, dict) else None
            if usage and usage.get("prompt_tokens") is not None:
                return int(usage["prompt_tokens"])
    except openai.APIError as error:
        raise UpstreamError(f"the upstream failed while counting tokens: {upstream_message(error)}") from None
    finally:
        await upstream.close()
    raise UpstreamError("the upstream reported no usage.prompt_tokens: it cannot count prompt tokens")
