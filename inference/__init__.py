"""Model loading, prompt building and generation engines. Knows nothing of HTTP or UIs."""

from inference.engines.base import Engine
from inference.engines.batched.engine import BatchedEngine
from inference.engines.factory import build_engine
from inference.engines.sequential import SequentialEngine
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
