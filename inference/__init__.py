"""Model loading, prompt building and generation engines. Knows nothing of HTTP or UIs."""

from inference.batching import BatchedEngine
from inference.engine import Engine, SequentialEngine, build_engine
from inference.settings import Settings
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
)

__all__ = [
    "BatchedEngine",
    "ContextTooLong",
    "Engine",
    "EngineBusy",
    "EngineNotReady",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "InferenceError",
    "InvalidRequest",
    "Message",
    "ModelInfo",
    "ModelLoadError",
    "SequentialEngine",
    "Settings",
    "StreamEvent",
    "TextDelta",
    "build_engine",
]
