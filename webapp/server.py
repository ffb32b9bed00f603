"""create_app(settings, engine): the FastAPI app with the API routers and the Gradio page at `/`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from inference import Engine
from webapp.api.anthropic import routes as anthropic_routes
from webapp.api.openai import chat as openai_routes
from webapp.api.openai import completions as completions_routes
from webapp.api.openai import models as openai_models
from webapp.api.openapi import install_openapi
from webapp.api.responses import routes as responses_routes
from webapp.api.spec import routes as spec_routes
from webapp.errors import install_error_handlers, install_unmatched_routes
from webapp.middleware.auth import ApiKeyMiddleware
from webapp.middleware.body_limit import BodySizeLimitMiddleware
from webapp.middleware.cors import ApiCORSMiddleware
from webapp.middleware.observability import RequestObserver, RequestObserverMiddleware
from webapp.ops import health as ops
from webapp.ops.metrics import ServiceMetrics
from webapp.settings import Settings
from webapp.ui.layout import mount_ui

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    engine: Engine,
    api_keys: list[str],
    *,
    on_load_failed: Callable[[BaseException], None] | None = None,
    with_ui: bool = True,
) -> FastAPI:
    """The whole service. The engine loads in the background once the app starts (if not loaded yet)."""
    if not api_keys:
        raise ValueError("at least one API key is required")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading: asyncio.Task[None] | None = None
        engine.add_result_listener(observer.on_result)
        if engine.state == "loading":
            loading = asyncio.create_task(_load(engine, on_load_failed))
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            engine.remove_result_listener(observer.on_result)
            engine.close()

    app = FastAPI(
        title="Sahabat-AI text generation API",
        version="1.0.0",
        description="Indonesian-language chat model behind a documented REST API and a chat page.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.started_at = int(time.time())
    app.state.api_keys = [key.encode("utf-8") for key in api_keys]
    metrics = ServiceMetrics(engine)
    observer = RequestObserver(metrics, log_prompts=settings.log_prompts)
    app.state.metrics = metrics
    app.add_middleware(ApiKeyMiddleware)  # innermost: its 401s are logged and counted like every other answer
    app.add_middleware(RequestObserverMiddleware, observer=observer)
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(spec_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(openai_models.router)
    app.include_router(completions_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(responses_routes.router)
    install_unmatched_routes(app)  # after every API route, before the page's mount at /
    install_openapi(app, settings)
    # Covers the API, the docs and the Gradio page alike.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Outside that: the API's CORS headers reach its error responses too (a 413 included).
    app.add_middleware(ApiCORSMiddleware, allow_origins=settings.cors_origins())
    if with_ui:
        app = mount_ui(app, engine, settings)
    return app


async def _load(engine: Engine, on_load_failed: Callable[[BaseException], None] | None) -> None:
    try:
        await engine.start()
    except Exception as error:
        logger.error("%s", engine.state_reason)
        if on_load_failed is not None:
            on_load_failed(error)
