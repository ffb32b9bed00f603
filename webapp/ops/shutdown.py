"""Graceful shutdown: on SIGTERM (or Ctrl+C) drain, then stop, then exit 0.

1. The first signal drains the engine: new work is refused with 503 + Retry-After, `/ready` turns
   503 (so a load balancer stops routing here), `/health` stays 200, and the listening socket stays
   open so late requests get that clear 503 rather than a refused connection.
2. Once the engine has no queued or running generation, or SHUTDOWN_TIMEOUT_S has passed, uvicorn's
   own shutdown runs: it stops listening, lets open responses finish within what is left of the
   timeout (at least a second), cancels what remains, and runs the app's lifespan shutdown.
3. The process exits 0. A second signal skips the wait.

uvicorn re-raises a captured SIGTERM after shutdown, which would end the process with status 143;
this server handles the signals itself, so the exit is a clean 0.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from inference import Engine

logger = logging.getLogger(__name__)

MIN_FINAL_GRACE_S = 1.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self.drain_started: float | None = None
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging, no awaiting); on_tick does the rest.
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.engine.drain("the service is shutting down")
        elif not self.should_exit:
            # Skip the wait, as if SHUTDOWN_TIMEOUT_S had run out: open responses get the final grace, then are
            # cancelled (uvicorn would otherwise wait up to the whole timeout for a plain, unstreamed reply).
            self.config.timeout_graceful_shutdown = MIN_FINAL_GRACE_S
            self.should_exit = True
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            elapsed = time.monotonic() - self.drain_started
            if not self._announced:
                self._announced = True
                logger.info(
                    "shutdown requested: refusing new work, waiting up to %.0f s for %d running and %d queued "
                    "generation(s)",
                    self.shutdown_timeout_s,
                    self.engine.running,
                    self.engine.queue_depth,
                )
            if self.engine.idle or elapsed >= self.shutdown_timeout_s:
                if not self.engine.idle:
                    logger.warning(
                        "shutdown timeout of %.0f s reached with %d generation(s) unfinished; stopping them",
                        self.shutdown_timeout_s,
                        self.engine.running + self.engine.queue_depth,
                    )
                self.config.timeout_graceful_shutdown = max(MIN_FINAL_GRACE_S, self.shutdown_timeout_s - elapsed)
                self.should_exit = True
        return await super().on_tick(counter)
