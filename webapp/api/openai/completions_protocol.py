"""The bodies and responses of `POST /v1/completions`, OpenAI's legacy text-completion route (a raw prompt in, text
out: no chat template)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from webapp.api.fields import (
    NULL,
    STREAM_OPTIONS_NEED_STREAM,
    RequestModel,
    Text,
    _check_stops,
    _stop_schema,
    _valid_unicode,
    field_absent_or,
    schema_is,
    when,
)
from webapp.api.openai.protocol import RESPONSE_FORMAT_SCHEMA, OpenAIUsage, StreamOptions

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for max_tokens on this route
MAX_PROMPTS = 16  # prompts in one request: the batched engine's MAX_BATCH on CPU, so one list runs as one batch
MAX_LEGACY_LOGPROBS = 5  # the legacy API's most alternatives per token


def _prompt_schema(schema: dict[str, Any]) -> None:
    """Document the prompt rules the validator checks: non-empty text, a list of 1 to MAX_PROMPTS of them."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch.update(minItems=1, maxItems=MAX_PROMPTS)
            branch.setdefault("items", {})["minLength"] = 1


def _off_only_schema(schema: dict[str, Any]) -> None:
    """Document a field accepted only at the value that means "off": null or the empty string."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["maxLength"] = 0


class CompletionRequest(RequestModel):
    """`POST /v1/completions`. Fields OpenAI defines that this server cannot honour are a 400, never silence."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                when("echo", {"const": True}, field_absent_or("logprobs", NULL)),  # see unsupported()
                STREAM_OPTIONS_NEED_STREAM,
            ]
        }
    )

    model: str | None = Field(
        None, description="A name `GET /v1/models` lists (the served id or `sahabat-ai`); another is a 404."
    )
    prompt: Text | list[Text] = Field(
        description=f"The model's input as it is (no chat template): a string, or a list of up to {MAX_PROMPTS} "
        "strings, one choice each (run together in one batch).",
        json_schema_extra=_prompt_schema,
    )
    max_tokens: int = Field(DEFAULT_COMPLETION_TOKENS, ge=1, description="Most tokens per choice (default 16).")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1000, description="Extension (as in vLLM).")
    min_p: float | None = Field(None, ge=0, le=1, description="Extension (as in vLLM).")
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0, description="Extension (as in vLLM).")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = Field(
        None, description="A stop sequence or up to 4; the match is not returned.", json_schema_extra=_stop_schema
    )
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Return the prompt followed by the completion.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LEGACY_LOGPROBS, description="Each token's logprob and the k most likely alternatives."
    )
    response_format: dict | None = Field(
        None,
        description="`json_object` or `json_schema`: the completion is constrained to JSON (docs/api.md).",
        json_schema_extra=schema_is(RESPONSE_FORMAT_SCHEMA),
    )
    # Accepted only at the value that means "off": anything else is refused (400, naming the field).
    suffix: str | None = Field(
        None, description="Not supported (insertion): only null or empty.", json_schema_extra=_off_only_schema
    )
    n: int = Field(1, json_schema_extra={"minimum": 1, "maximum": 1})
    best_of: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": 1})
    logit_bias: dict | None = Field(None, json_schema_extra={"maxProperties": 0})
    user: str | None = None  # harmless metadata, accepted and ignored

    _stops = field_validator("stop")(_check_stops)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        if isinstance(value, list):
            if any(isinstance(item, (int, list)) for item in value):
                raise ValueError("token-id prompts are not supported: send the prompt as text")
            if not value:
                raise ValueError("at least one prompt is required")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(value)}")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                _valid_unicode(item)
                if not item:
                    raise ValueError("a prompt must not be empty")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(field, reason) of the first field set to something this server does not do."""
        checks: list[tuple[str, bool, str]] = [
            ("suffix", bool(self.suffix), "suffix (insertion, fill-in-the-middle) is not supported"),
            ("n", self.n != 1, "only n=1 is supported (send a list of prompts for several completions)"),
            ("best_of", self.best_of not in (None, 1), "only best_of=1 is supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            (
                "echo",
                self.echo and self.logprobs is not None,
                "echo with logprobs is not supported (it needs the prompt tokens' logprobs)",
            ),
        ]
        for name, refused, reason in checks:
            if refused:
                return name, reason
        return None


class LegacyLogprobs(BaseModel):
    """The legacy API's logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: LegacyLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """The response, and each streamed chunk (then `finish_reason` is null until the choice's last chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None
