"""`build_engine(settings)`: the engine ENGINE asks for. The only module that knows all three engines."""

from __future__ import annotations

from inference.engines.base import Engine
from inference.settings import EngineSettings


def build_engine(settings: EngineSettings) -> Engine:
    """The engine the settings ask for."""
    if settings.engine == "sequential":
        from inference.engines.sequential import SequentialEngine

        return SequentialEngine(settings)
    if settings.engine == "batched":
        from inference.engines.batched.engine import BatchedEngine

        return BatchedEngine(settings)
    if settings.engine == "remote":
        from inference.engines.remote import RemoteEngine  # imports the openai client only in remote mode

        return RemoteEngine(settings)
    raise ValueError(f"unknown ENGINE {settings.engine!r}")
