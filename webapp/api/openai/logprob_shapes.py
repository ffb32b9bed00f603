"""Token logprobs (`inference.TokenLogprob`, on each `TextDelta`) in the OpenAI response shapes.

- `chat_logprobs`: `/v1/chat/completions`' `choices[].logprobs`: `{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}` (non-stream: every token; a stream chunk:
  the tokens of its text).
- `legacy_logprobs`: `/v1/completions`' `choices[].logprobs`: `{"tokens", "token_logprobs", "top_logprobs"
  (one `{token: logprob}` per position), "text_offset"}`.

A token's `token` is its text decoded alone and `bytes` that text's UTF-8; a token that holds only part of a
multi-byte character decodes to U+FFFD (documented in docs/api.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from inference import TokenLogprob
from webapp.api.openai.protocol import OpenAIChoiceLogprobs, OpenAITokenLogprob, OpenAITopLogprob


def chat_logprobs(tokens: Iterable[TokenLogprob]) -> OpenAIChoiceLogprobs:
    """The chat completion's `logprobs` object for `tokens`."""
    return OpenAIChoiceLogprobs(
        content=[
            OpenAITokenLogprob(
                token=token.token,
                logprob=token.logprob,
                bytes=list(token.token.encode("utf-8")),
                top_logprobs=[
                    OpenAITopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))
                    for text, logprob in token.top
                ],
            )
            for token in tokens
        ]
    )


def legacy_logprobs(tokens: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, list]:
    """The legacy completion's `logprobs` object; `text_offset` is where the first token starts (the prompt's
    length with `echo`, else 0)."""
    offsets: list[int] = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.token)
    return {
        "tokens": [token.token for token in tokens],
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [dict(token.top) for token in tokens],
        "text_offset": offsets,
    }
