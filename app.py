"""Entry point: read settings, build the engine, serve the API and the chat page with uvicorn."""

from __future__ import annotations

import logging
import secrets
import sys

import uvicorn
from pydantic import ValidationError

from inference import build_engine
from inference.settings import Settings
from webapp.server import create_app

logger = logging.getLogger("app")


def read_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in error.errors())
        sys.exit(f"invalid configuration: {problems}")


def resolve_api_keys(settings: Settings) -> list[str]:
    try:
        keys = settings.load_api_keys()
    except ValueError as error:
        sys.exit(f"invalid configuration: {error}")
    if keys:
        return keys
    key = "sk-" + secrets.token_urlsafe(24)
    # Printed once to the console, never logged: the operator needs it to call the API.
    print(f"No API_KEYS configured; generated an API key for this run: {key}", flush=True)
    return [key]


def main() -> None:
    settings = read_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_keys = resolve_api_keys(settings)
    engine = build_engine(settings)
    config = uvicorn.Config(
        None,  # set below, once the server object exists for the load-failure callback
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def on_load_failed(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    config.app = create_app(settings, engine, api_keys, on_load_failed=on_load_failed)
    server.run()
    if failed:
        # The error itself: by now engine.state_reason only says the service is shutting down.
        sys.exit(f"start-up failed: {failed[0]}")


if __name__ == "__main__":
    main()
