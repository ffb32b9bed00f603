"""The limits every protocol checks on a conversation (MAX_HISTORY_MESSAGES, MAX_TOTAL_CHARS) and on the tokens asked for (MAX_NEW_TOKENS_CAP)."""

from __future__ import annotations

from webapp.errors import BadRequest
from webapp.settings import Settings


def check_conversation_limits(
    settings: Settings, *, history_messages: int, total_chars: int, history_field: str, text_field: str
) -> None:
    """MAX_HISTORY_MESSAGES and MAX_TOTAL_CHARS, as 400s naming the field and the setting."""
    if history_messages > settings.max_history_messages:
        raise BadRequest(
            f"{history_field}: {history_messages} earlier messages, above the limit of "
            f"{settings.max_history_messages} (MAX_HISTORY_MESSAGES)",
            param=history_field,
        )
    if total_chars > settings.max_total_chars:
        raise BadRequest(
            f"{text_field}: the messages hold {total_chars} characters together, above the limit of "
            f"{settings.max_total_chars} (MAX_TOTAL_CHARS)",
            param=text_field,
        )


def check_max_new_tokens(value: int, cap: int, field: str = "max_new_tokens") -> None:
    if value > cap:
        raise BadRequest(f"{field}: must be at most {cap} (MAX_NEW_TOKENS_CAP)", param=field)
