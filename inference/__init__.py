"""Model loading, prompt building and generation engines. Knows nothing of HTTP or UIs."""

from inference.batched import BatchedEngine
from inference.engine import Engine
from inference.factory import build_engine
from inference.sequential import SequentialEngine
from inference.settings import EngineSettings
from inference.types import (
    ENGINE_STATES,
    ContextTooLong,
    EngineBusy,
    EngineNotReady,
    EngineState,
    GenerationFailed,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    InvalidRequest,
    Message,
    ModelInfo,
    ModelLoadError,
    ResponseFormat,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    UpstreamError,
)

__all__ = [
    "ENGINE_STATES",
    "BatchedEngine",
    "ContextTooLong",
    "Engine",
    "EngineBusy",
    "EngineNotReady",
    "EngineSettings",
    "EngineState",
    "GenerationFailed",
    "GenerationRequest",
    "GenerationResult",
    "InferenceError",
    "InvalidRequest",
    "Message",
    "ModelInfo",
    "ModelLoadError",
    "ResponseFormat",
    "SequentialEngine",
    "StreamEvent",
    "TextDelta",
    "TokenLogprob",
    "UpstreamError",
    "build_engine",
]
