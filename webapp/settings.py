"""Every knob of the service in one class: the model and engine ones (`inference.settings.EngineSettings`) and the
HTTP server, request-limit, page and operations ones below. It drives `--help`, the README table and `.env`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from inference.settings import EngineSettings

DEFAULT_CHAT_SYSTEM_MESSAGE = (
    "You are Sahabat, a friendly and helpful assistant. Always answer in the language the user "
    "writes in, including Indonesian (Bahasa Indonesia), Javanese (Basa Jawa) and Sundanese "
    "(Basa Sunda). Be clear, warm and concise."
)


def parse_credentials(text: str) -> list[tuple[str, str]]:
    """`user:password,user2:password2` -> pairs. The error says which entry is wrong, never what it holds."""
    pairs: list[tuple[str, str]] = []
    for position, item in enumerate((i.strip() for i in text.split(",") if i.strip()), start=1):
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"entry {position} is not `user:password`")
        pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError("no `user:password` pair given")
    return pairs


ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)


def parse_origins(text: str) -> list[str]:
    """`https://a.example, http://localhost:3000` -> origins, or `*`; an entry with a path (or a trailing `/`,
    which no browser sends) is refused, since it would never match."""
    origins = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in origins:
        if len(origins) > 1:
            raise ValueError("`*` allows every origin; give it alone or list the origins")
        return origins
    for position, origin in enumerate(origins, start=1):
        if not ORIGIN.fullmatch(origin):
            raise ValueError(
                f"entry {position} ({origin!r}) is not an origin: scheme://host[:port], no path or trailing `/`"
            )
    return origins


class Settings(EngineSettings):
    """Service settings. Each field is read from the environment variable of the same name, upper-cased."""

    # Request limits (each refused with a clear 4xx before any work is done)
    max_new_tokens_cap: int = Field(2048, ge=1, description="Largest `max_new_tokens` a request may ask for.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest HTTP request body in bytes, on every route (413 above it)."
    )
    max_history_messages: int = Field(
        100,
        ge=0,
        description="Most earlier messages a request may carry (`conversation_history`, or `messages` "
        "before the last one on /v1).",
    )
    max_total_chars: int = Field(
        100_000,
        ge=1,
        description="Most characters of message text in one request (system message, history "
        "and the new text together).",
    )

    # HTTP server
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port, logged at start).")
    api_keys: SecretStr | None = Field(None, description="Comma-separated Bearer API keys.")
    api_keys_file: Path | None = Field(None, description="File with one API key per line (`#` comments).")
    gradio_auth: SecretStr | None = Field(
        None, description="Protect the chat page at `/` with a login: comma-separated `user:password` pairs."
    )
    cors_allow_origins: str = Field(
        "*",
        description="Browser origins (`https://app.example`, comma-separated) allowed to call /v1 and /api/v1 "
        "from another site; `*` allows any origin, empty allows none. The API keys are Bearer headers, not cookies, "
        "so no credentials mode is offered.",
    )
    chat_system_message: str = Field(
        DEFAULT_CHAT_SYSTEM_MESSAGE, description="The automatic system message of `/api/v1/chat` and the UI."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    # Operations
    log_format: Literal["text", "json"] = Field(
        "text", description="`text` (human-readable) or `json` (one JSON object per line)."
    )
    log_prompts: bool = Field(False, description="Put the prompt text in the request log lines (off: never logged).")
    metrics_public: bool = Field(
        False, description="Serve `GET /metrics` without an API key (for a scraper inside a trusted network)."
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long running generations may take to finish before the process exits anyway.",
    )

    @field_validator("gradio_auth")
    @classmethod
    def _gradio_auth_pairs(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_credentials(value.get_secret_value())
        return value

    @field_validator("cors_allow_origins")
    @classmethod
    def _cors_origins(cls, value: str) -> str:
        parse_origins(value)
        return value

    def cors_origins(self) -> list[str]:
        """CORS_ALLOW_ORIGINS as a list: `["*"]`, the given origins, or empty (no cross-origin browser calls)."""
        return parse_origins(self.cors_allow_origins)

    def gradio_credentials(self) -> list[tuple[str, str]]:
        """GRADIO_AUTH as (user, password) pairs; empty if unset."""
        return [] if self.gradio_auth is None else parse_credentials(self.gradio_auth.get_secret_value())

    def load_api_keys(self) -> list[str]:
        """The configured keys, from API_KEYS and API_KEYS_FILE together; empty if none is set."""
        keys: list[str] = []
        if self.api_keys is not None:
            keys += [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise ValueError(f"API_KEYS_FILE {self.api_keys_file} cannot be read: {error.strerror}") from None
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys
