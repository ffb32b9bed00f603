"""API keys: `Authorization: Bearer <key>` (OpenAI's clients, the documented API) or `x-api-key: <key>` (Anthropic's
clients), the same keys and the same constant-time check on every route.

The routers' `authenticate` dependency checks the key (and documents the schemes in the OpenAPI schema); it also
guards /metrics. `ApiKeyMiddleware` makes it answer before the body is read or parsed.

`authenticate` also names the key for fair admission (`client_of`): `key-<n>`, the key's place among the configured
ones (API_KEYS, then API_KEYS_FILE), never the secret or a hash of it, so logs and the engine see no part of it."""

from __future__ import annotations

import dataclasses
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference import GenerationRequest

bearer_scheme = HTTPBearer(auto_error=False, description="An API key from API_KEYS or API_KEYS_FILE.")
api_key_header = APIKeyHeader(
    name="x-api-key", auto_error=False, description="The same API keys, as Anthropic's clients send them."
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def key_matches(candidate: str, keys: list[bytes]) -> bool:
    """Constant-time comparison against every configured key (no early exit on the first match)."""
    return key_index(candidate, keys) is not None


def key_index(candidate: str, keys: list[bytes]) -> int | None:
    """The position of the first configured key equal to `candidate`, else None; every key is compared, in
    constant time, whichever matches."""
    given = candidate.encode("utf-8", "surrogatepass")
    found: int | None = None
    for index, key in enumerate(keys):
        if hmac.compare_digest(given, key) and found is None:
            found = index
    return found


MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
INVALID_KEY = "invalid API key"
API_PREFIXES = ("/v1", "/api/v1")


def presented_key(headers: Headers) -> str | None:
    """The Bearer key if one is sent (HTTPBearer's rule: the `bearer` scheme, any case, and a value), else the
    `x-api-key` header, else None."""
    scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return headers.get("x-api-key") or None


def key_problem(headers: Headers, keys: list[bytes]) -> str | None:
    """None when the request carries a configured key, else the 401's message."""
    given = presented_key(headers)
    if not given:
        return MISSING_KEY
    return None if key_matches(given, keys) else INVALID_KEY


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    api_key: Annotated[str | None, Depends(api_key_header)] = None,
) -> None:
    """401 unless the request carries a configured key (`presented_key`). The parameters document the two schemes
    in the OpenAPI schema; the headers are read here, so a direct call (as /metrics makes) checks the same."""
    problem = key_problem(request.headers, request.app.state.api_keys)
    if problem is not None:
        raise _unauthorized(problem)
    index = key_index(presented_key(request.headers) or "", request.app.state.api_keys)
    request.state.client = f"key-{index + 1}" if index is not None else None


def client_of(request: Request, generation: GenerationRequest) -> GenerationRequest:
    """`generation` named after the API key `authenticate` accepted (`key-<n>`), for the engines' round-robin across
    keys and MAX_RUNNING_PER_KEY. A request that met no key check (the chat page) keeps None: one shared identity."""
    return dataclasses.replace(generation, client=getattr(request.state, "client", None))


class ApiKeyMiddleware:
    """ASGI middleware: a /v1 or /api/v1 request without a configured key reaches its route with an empty body, so
    the route's `authenticate` answers 401 before anything of the body is read or parsed (malformed JSON, not
    UTF-8), and the request log and /metrics still name the route. OPTIONS requests (preflights) pass as they are."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        guarded = scope["type"] == "http" and scope["method"] != "OPTIONS"
        api = any(path == prefix or path.startswith(prefix + "/") for prefix in API_PREFIXES)
        if guarded and api and key_problem(Headers(scope=scope), scope["app"].state.api_keys) is not None:
            await self.app(scope, _no_body, send)
            return
        await self.app(scope, receive, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
