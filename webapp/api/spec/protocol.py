"""The documented API's bodies and responses (docs/api.md): generate-text and chat."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from webapp.api.fields import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    RequestModel,
    Text,
    _check_stops,
    _stop_schema,
)


class ChatMessage(RequestModel):
    role: Literal["user", "assistant", "system"] = Field(description="Who said it.")
    content: Text = Field(description="What was said.")


class SamplingParams(RequestModel):
    """Generation knobs shared by the documented endpoints."""

    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS, ge=1, description="Most tokens to generate (capped by MAX_NEW_TOKENS_CAP)."
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2, description="0 is greedy; higher is more random.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Sample from the k most likely tokens.")
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0, description="Above 1 discourages repeats.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Same seed and input give the same text.")
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="Extension (OpenAI's): lowers the logit of every token already generated."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="Extension (OpenAI's): lowers a token's logit per time it was generated."
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="Extension: drop tokens below min_p x the most likely token's probability."
    )
    stop: list[str] | None = Field(
        None,
        max_length=4,
        description="Up to 4 stop sequences; the match is not returned.",
        json_schema_extra=_stop_schema,
    )

    _stops = field_validator("stop")(_check_stops)


class TextGenerationRequest(SamplingParams):
    # The pattern documents the not-blank rule below for clients and fuzzers (JSON Schema `pattern` searches).
    text: Text = Field(description="The user message or prompt.", json_schema_extra={"pattern": r"\S"})
    system_message: Text | None = Field(None, description="Optional system message for the conversation.")
    conversation_history: list[ChatMessage] | None = Field(
        None, description="Earlier messages, oldest first (roles user/assistant/system)."
    )
    stream: bool = Field(
        False, description="Stream the reply as text/event-stream: `delta` events, then one `complete` event."
    )

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be empty")
        return value


class GenerateTextRequest(TextGenerationRequest):
    """Body of `POST /api/v1/generate-text`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"text": "Sopo wae sing ana ing Punakawan?", "max_new_tokens": 256, "temperature": 0.7}]
        }
    )


class ChatRequest(TextGenerationRequest):
    """Body of `POST /api/v1/chat`. `system_message`, if given, replaces the automatic one."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"text": "Ceritakne babagan sejarah Jawa", "max_new_tokens": 512, "temperature": 0.8}]
        }
    )


class GenerateTextResponse(BaseModel):
    """Response of both documented endpoints."""

    generated_text: str
    full_conversation: list[ChatMessage]
    model: str
    input_length: int
    output_length: int
