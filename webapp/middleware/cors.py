"""CORS for browser apps on other origins: Starlette's `CORSMiddleware`, on the API paths (`/v1`, `/api/v1`) only.

- `CORS_ALLOW_ORIGINS` (`*`, a list of origins, or empty for none) decides which origins may read the replies;
- preflights on the API paths are answered here, before routing (so the Gradio mount at `/`, which answers
  preflights of its own for localhost origins, never sees them), and every API response carries the headers,
  error responses (401, 400, 413, 503, ...) included, since this is the outermost of the app's middleware;
- the browser may send `Authorization` (the Bearer key) or `X-API-Key`, Anthropic's version headers and
  `X-Request-ID`, and may read `X-Request-ID` and `Retry-After`; `allow_credentials` stays off: the keys are
  headers, never cookies.

The page at `/` and Gradio's own routes keep Gradio's policy (same-origin for the page; localhost origins for its
API): this middleware is not a `CORSMiddleware` class, so `mount_gradio_app` does not hand its CORS over to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_PREFIXES = ("/v1", "/api/v1")
ALLOW_METHODS = ("GET", "POST")
ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-Request-ID",
    # Anthropic's SDKs: the key as x-api-key, the API version, and the browser opt-in of its JavaScript SDK
    "X-API-Key",
    "Anthropic-Version",
    "Anthropic-Beta",
    "Anthropic-Dangerous-Direct-Browser-Access",
)
EXPOSE_HEADERS = ("X-Request-ID", "Retry-After")
PREFLIGHT_MAX_AGE_S = 600


def is_api_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in API_PREFIXES)


class ApiCORSMiddleware:
    """Starlette's `CORSMiddleware` for the API paths; every other path passes through untouched."""

    def __init__(self, app: ASGIApp, allow_origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            _without_inner_cors_headers(app),
            allow_origins=list(allow_origins),
            allow_methods=ALLOW_METHODS,
            allow_headers=ALLOW_HEADERS,
            allow_credentials=False,
            expose_headers=EXPOSE_HEADERS,
            max_age=PREFLIGHT_MAX_AGE_S,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api_path(scope["path"]):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _without_inner_cors_headers(app: ASGIApp) -> ASGIApp:
    """On an API path the policy is this module's alone: a request that falls through the API routes to the
    Gradio mount (an unknown method, say) must not come back with Gradio's localhost CORS headers mixed in."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_without(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name in [key for key in headers if key.lower().startswith("access-control-")]:
                    del headers[name]
            await send(message)

        await app(scope, receive, send_without)

    return wrapped
