"""Every request and response model of the HTTP API, in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant", "system"] = Field(description="Who said it.")
    content: str = Field(description="What was said.")


class SamplingParams(BaseModel):
    """Generation knobs shared by the documented endpoints."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS, ge=1, description="Most tokens to generate (capped by MAX_NEW_TOKENS_CAP)."
    )
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2, description="0 is greedy; higher is more random.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, le=1000, description="Sample from the k most likely tokens.")
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0, description="Above 1 discourages repeats.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Same seed and input give the same text.")
    stop: list[str] | None = Field(None, max_length=4, description="Up to 4 stop sequences; the match is not returned.")

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value


class TextGenerationRequest(SamplingParams):
    text: str = Field(description="The user message or prompt.")
    system_message: str | None = Field(None, description="Optional system message for the conversation.")
    conversation_history: list[ChatMessage] | None = Field(
        None, description="Earlier messages, oldest first (roles user/assistant/system)."
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


class ErrorResponse(BaseModel):
    detail: str


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    """`GET /ready`: 200 once the model is loaded and the engine admits work, else 503 with the reason."""

    status: Literal["ready", "loading", "failed", "stopping"]
    reason: str
    model: str | None = None
