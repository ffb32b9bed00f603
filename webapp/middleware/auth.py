"""The API-key dependency: `Authorization: Bearer <key>` (OpenAI's clients, the documented API) or `x-api-key: <key>`
(Anthropic's clients), the same keys and the same constant-time check on every route."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

bearer_scheme = HTTPBearer(auto_error=False, description="An API key from API_KEYS or API_KEYS_FILE.")
api_key_header = APIKeyHeader(
    name="x-api-key", auto_error=False, description="The same API keys, as Anthropic's clients send them."
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def key_matches(candidate: str, keys: list[bytes]) -> bool:
    """Constant-time comparison against every configured key (no early exit on the first match)."""
    given = candidate.encode("utf-8", "surrogatepass")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_header)] = None,
) -> None:
    """The Bearer key if one is sent, else the `x-api-key` header; 401 if neither is a configured key. (Called
    directly, as /metrics does, the header is read here.)"""
    if api_key is None:
        api_key = request.headers.get("x-api-key")
    given = credentials.credentials if credentials is not None else api_key
    if not given:
        raise _unauthorized("missing API key: send the header 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    if not key_matches(given, request.app.state.api_keys):
        raise _unauthorized("invalid API key")
