"""Model loading, prompt building and generation engines. Knows nothing of HTTP or UIs."""

from inference.batching import BatchedEngine
from inference.engine import Engine, SequentialEngine, build_engine
from inference.settings import EngineSettings
from inference.types import (
    ContextTooLong,
    EngineBusy,
    EngineNotReady,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequest,
    Message,
    ModelInfo,
    ModelLoadError,
    StreamEvent,
    TextDelta,
    UpstreamError,
)

__all__ = [
    "BatchedEngine",
    "ContextTooLong",
    "Engine",
    "EngineBusy",
    "EngineNotReady",
    "EngineSettings",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "InferenceError",
    "InvalidRequest",
    "Message",
    "ModelInfo",
    "ModelLoadError",
    "SequentialEngine",
    "StreamEvent",
    "TextDelta",
    "UpstreamError",
    "build_engine",
]
