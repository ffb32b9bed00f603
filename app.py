"""Entry point: read settings, build the engine, serve the API and the chat page with uvicorn.

`python app.py --help` lists every setting. Heavy modules (torch, transformers, gradio) are imported
only after the settings are valid, so `--help` and configuration errors answer at once.
"""

from __future__ import annotations

import logging
import secrets
import sys

from webapp.cli import load_settings
from webapp.settings import Settings

logger = logging.getLogger("app")


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
    settings = load_settings(sys.argv[1:])
    api_keys = resolve_api_keys(settings)
    from inference.cpu.paths import apply_torch_caps

    capped = apply_torch_caps(settings.cpu_isa)  # before torch is imported: its kernels read these once

    import uvicorn

    from inference import build_engine
    from webapp.middleware.observability import configure_logging
    from webapp.ops.shutdown import DrainingServer
    from webapp.server import create_app

    configure_logging(settings.log_level, settings.log_format)
    if capped:
        logger.info("CPU_ISA=%s: %s", settings.cpu_isa, " ".join(f"{k}={v}" for k, v in capped.items()))
    engine = build_engine(settings)
    config = uvicorn.Config(
        None,  # set below, once the server object exists for the load-failure callback
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the service's handlers (LOG_FORMAT); uvicorn's loggers propagate to them
        access_log=False,  # webapp.middleware.observability writes one line per request instead
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),  # DrainingServer adjusts it
    )
    server = DrainingServer(config, engine, settings.shutdown_timeout_s)
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
