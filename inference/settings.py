"""The model and engine knobs, read from environment variables (and a `.env` file).

The HTTP server, request-limit, page and operations knobs extend this class in `webapp/settings.py`; that
subclass is the service's one settings source (`--help`, the README table, `.env`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inference.model.cache import default_cache_dir

SAHABAT_AI_MODEL_ID = "GoToCompany/gemma2-9b-cpt-sahabatai-v1-instruct"
EMBEDDED_MODEL_ID = "embedded"


class EngineSettings(BaseSettings):
    """Model and engine settings. Each field is read from the environment variable of the same name, upper-cased."""

    # hide_input_in_errors: a misconfigured secret (API_KEYS, GRADIO_AUTH, HF_TOKEN) never reaches an error message.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    # Model
    model_id: str = Field(
        "auto",
        description="`auto` (sahabat-ai on a CUDA GPU, else the embedded demo model), `embedded`, "
        "a Hugging Face hub id, or a local model directory.",
    )
    quantization: Literal["auto", "8bit", "4bit", "none"] = Field(
        "auto",
        description="bitsandbytes quantization of the linear layers, on CUDA and on CPU alike; `auto` is 8bit on "
        "CUDA and none on CPU.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; `auto` is bf16 where the device supports it, else fp32."
    )
    hf_token: SecretStr | None = Field(None, description="Token for gated or private hub models.")
    trust_remote_code: bool = Field(False, description="Allow model repos that ship their own code.")
    model_cache: bool = Field(
        True, description="Cache the embedded model's dequantised weights in MODEL_CACHE_DIR for a fast second start."
    )
    memory_check: bool = Field(
        True,
        description="Before loading, estimate the weights' size for QUANTIZATION from the model's config and refuse "
        "a model that does not fit in the available RAM (free GPU memory on CUDA), naming the QUANTIZATION that fits; "
        "then admit each request only when its KV cache and prefill fit what was left once the model was ready "
        "(a request that never can is a 400, one that cannot yet waits, then 503; docs/operations.md#memory).",
    )
    cpu_isa: Literal["auto", "avx512", "avx2"] = Field(
        "auto",
        description="The CPU instruction sets the service may use: `auto` (all the CPU has), `avx512` (no AMX) or "
        "`avx2` (AVX2+FMA+F16C only, as on an AVX2-only CPU: float32 instead of bf16, no bf16 prepack, the native "
        "build for x86-64-v3; also caps torch's kernels when ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA are unset). "
        "The path in force is in the ready log line and /metrics (docs/cpu-paths.md).",
    )
    pack_cpu_weights: bool = Field(
        True,
        description="Prepack linear layers' weights for oneDNN once at load, off the native path: bf16 models where "
        "bf16 matmuls are native (AVX-512 BF16, AMX), float32 Llama models (the lean path). Faster matmuls "
        "(docs/cpu-paths.md), a second copy of those weights.",
    )
    gguf_int4: bool = Field(
        True,
        description="The embedded model on an x86-64 CPU with AVX2: every forward pass runs as one C call over the "
        "GGUF's own 4-bit blocks (the `native` path: inference/cpu/native/forward.c, built at first start by the "
        "system C compiler, cached in MODEL_CACHE_DIR). `false`, or no compiler: torch on the dequantised weights.",
    )
    model_cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where the weight cache lives (about 270 MB for the embedded model; safe to delete).",
        json_schema_extra={"default_shown": "$XDG_CACHE_HOME/sahabat-ai-service, else ~/.cache/sahabat-ai-service"},
    )

    # Engine
    fast_decode: bool = Field(
        True,
        description="Batched engine on CPU (the native path, or a bf16 Llama model where bf16 is native): run each "
        "iteration as one lean forward pass that carries the running rows' next tokens and the newcomers' prompts "
        "together; `false`: transformers' forward per prefill and per step (the native path still takes its plain "
        "steps).",
    )
    engine: Literal["batched", "sequential", "remote"] = Field(
        "batched",
        description="Inference engine: `batched` (continuous batching: concurrent requests share forward passes), "
        "`sequential` (one `generate()` at a time, the baseline) or `remote` (an OpenAI-compatible upstream, "
        "REMOTE_URL).",
    )
    max_batch: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        "auto",
        description="Most requests generating together (batched engine); `auto` is 16 on CPU and 8 on a GPU, "
        "where each running request holds its KV cache in GPU memory.",
    )
    prefix_cache_tokens: int = Field(
        2048,
        ge=0,
        description="Batched engine on the native path: keep the KV of recent prompts, up to this many tokens in "
        "all, and start a new prompt from the longest prefix it shares with one (the chat template and system "
        "message, a conversation's earlier turns). Exact: the replies do not change, the first token comes sooner. "
        "0 turns it off.",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="Off the lean and native paths (transformers' forward: Gemma2, bitsandbytes, FAST_DECODE=false, "
        "the sequential engine), prefill prompts this many tokens per forward pass, so the attention scores take "
        "chunk x prompt memory instead of prompt x prompt; 0: the whole prompt in one pass.",
    )
    max_queue: int = Field(
        32, ge=0, description="Most requests waiting for a free slot; beyond it requests get 503 with Retry-After."
    )
    queue_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a request may wait for a free slot (or for memory, MEMORY_CHECK) before it fails with "
        "503; a stream that had started gets an error event in its protocol's shape instead.",
    )
    max_running_per_key: int = Field(
        0,
        ge=0,
        description="Most requests of one API key generating at once (batched engine; the sequential one runs one "
        "at a time anyway); 0: no cap. A key at its cap keeps its next requests waiting (they count towards "
        "MAX_QUEUE and fail after QUEUE_TIMEOUT) while other keys' requests are admitted. Waiting requests are "
        "admitted round-robin across keys whatever the cap; requests without a key (the chat page) share one.",
    )

    # Remote engine (ENGINE=remote): vLLM, TGI's Messages API, llama.cpp's server or another instance of this service
    remote_url: str | None = Field(
        None,
        validate_default=True,
        description="The upstream's OpenAI-compatible base URL, ending in `/v1` (e.g. http://vllm:8000/v1).",
    )
    remote_api_key: SecretStr | None = Field(None, description="Bearer key the upstream expects (never logged).")
    remote_model: str | None = Field(
        None, description="Model id to ask the upstream for; default: first of GET /models."
    )
    remote_connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to open a connection to the upstream.")
    remote_read_timeout_s: float = Field(
        120.0, gt=0, description="Longest silence from the upstream (waiting for the first token included)."
    )
    remote_health_interval_s: float = Field(
        10.0, gt=0, description="Seconds between upstream health probes while it is up (retried faster while down)."
    )
    remote_context_length: int | None = Field(
        None, ge=1, description="The upstream model's context, if the upstream does not report it (informational)."
    )
    remote_system_role: Literal["auto", "native", "fold"] = Field(
        "auto",
        description="System messages: `native` sends them as they are, `fold` merges them into the next user turn "
        "(for templates without a system role, e.g. Gemma2), `auto` folds once the upstream refuses one.",
    )

    @field_validator("model_id")
    @classmethod
    def _model_id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("MODEL_ID must not be empty")
        return value.strip()

    @field_validator("remote_url")
    @classmethod
    def _remote_url_for_remote_engine(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value.strip():
            url = value.strip().rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ValueError("must be an http:// or https:// URL, e.g. http://vllm:8000/v1")
            return url
        if info.data.get("engine") == "remote":
            raise ValueError("REMOTE_URL is required when ENGINE=remote (the upstream's base URL ending in /v1)")
        return None
