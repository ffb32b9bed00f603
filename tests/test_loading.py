"""Settings -> model choice, quantization, dtype, and readable start-up failures."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gemma_shape import TINY_SHAPE, gemma2_config, write_model_dir
from inference import Engine, GenerationRequest, GenerationResult, Message, build_engine
from inference.engines.base import LocalEngine
from inference.model import loading
from inference.model.loading import (
    build_quantization_config,
    choose_model,
    load_model,
    resolve_dtype,
    resolve_quantization,
)
from inference.settings import EMBEDDED_MODEL_ID, SAHABAT_AI_MODEL_ID
from inference.types import ModelLoadError
from tests.helpers import ROOT, free_port
from webapp.settings import Settings


def make_settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny-gemma2-loading"), gemma2_config(TINY_SHAPE))


# --- model choice ---------------------------------------------------------------------------------


def test_auto_serves_the_embedded_model_without_cuda() -> None:
    choice = choose_model(make_settings(model_id="auto"), has_cuda=False)
    assert choice.source == EMBEDDED_MODEL_ID
    assert "no CUDA" in choice.reason


def test_auto_serves_sahabat_ai_with_cuda() -> None:
    choice = choose_model(make_settings(model_id="auto"), has_cuda=True)
    assert choice.source == SAHABAT_AI_MODEL_ID == "GoToCompany/gemma2-9b-cpt-sahabatai-v1-instruct"


@pytest.mark.parametrize("has_cuda", [False, True])
def test_explicit_model_ids_are_kept(has_cuda: bool) -> None:
    assert choose_model(make_settings(model_id="embedded"), has_cuda).source == EMBEDDED_MODEL_ID
    assert choose_model(make_settings(model_id="org/some-model"), has_cuda).source == "org/some-model"
    assert choose_model(make_settings(model_id=" /models/x "), has_cuda).source == "/models/x"


def test_model_id_defaults_to_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_ID", raising=False)
    assert make_settings().model_id == "auto"
    monkeypatch.setenv("MODEL_ID", "embedded")
    assert make_settings().model_id == "embedded"


# --- quantization ---------------------------------------------------------------------------------


def test_8bit_config_for_cuda() -> None:
    config = build_quantization_config(resolve_quantization(make_settings(quantization="auto"), has_cuda=True))
    assert type(config).__name__ == "BitsAndBytesConfig"
    assert config.load_in_8bit is True and config.load_in_4bit is False


def test_4bit_config_is_nf4_with_bf16_compute() -> None:
    config = build_quantization_config("4bit")
    assert config.load_in_4bit is True and config.load_in_8bit is False
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_no_quantization_config_for_none() -> None:
    assert build_quantization_config("none") is None
    with pytest.raises(ValueError, match="unknown quantization"):
        build_quantization_config("3bit")


@pytest.mark.parametrize(
    ("requested", "expected"), [("auto", "none"), ("8bit", "8bit"), ("4bit", "4bit"), ("none", "none")]
)
def test_cpu_quantization(requested: str, expected: str) -> None:
    # bitsandbytes runs on CPU too (tests/test_quantization.py); `auto` stays unquantized there.
    assert resolve_quantization(make_settings(quantization=requested), has_cuda=False) == expected


@pytest.mark.parametrize(
    ("requested", "expected"), [("auto", "8bit"), ("8bit", "8bit"), ("4bit", "4bit"), ("none", "none")]
)
def test_cuda_quantization(requested: str, expected: str) -> None:
    assert resolve_quantization(make_settings(quantization=requested), has_cuda=True) == expected


def test_missing_bitsandbytes_on_cuda_is_a_readable_error(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "cuda_available", lambda: True)
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "bitsandbytes" else real_find_spec(name, *args)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError) as caught:
        load_model(make_settings(model_id=str(tiny_dir), quantization="auto"))
    message = str(caught.value)
    assert "QUANTIZATION=8bit needs the bitsandbytes package" in message
    assert "QUANTIZATION=none" in message and "\n" not in message


def test_broken_bitsandbytes_on_cuda_is_a_readable_error(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "cuda_available", lambda: True)
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *args: object())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ModelLoadError, match=r"QUANTIZATION=4bit needs bitsandbytes, which failed to import"):
        load_model(make_settings(model_id=str(tiny_dir), quantization="4bit"))


# --- device placement -----------------------------------------------------------------------------


class _Placed:
    def __init__(self, device: str, device_map: dict[str, object] | None) -> None:
        self.device = torch.device(device)
        if device_map is not None:
            self.hf_device_map = device_map


def test_placement_on_one_device() -> None:
    assert loading.describe_placement(_Placed("cpu", None)) == "cpu"
    assert loading.describe_placement(_Placed("cpu", {"": 0})) == "cpu"


def test_placement_with_offloaded_layers_is_said_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "disk"}
    with caplog.at_level("WARNING", logger="inference.model.loading"):
        placement = loading.describe_placement(_Placed("cpu", device_map))
    assert placement == "cpu (2 of 4 modules offloaded to cpu and disk)"
    assert "does not fit in GPU memory" in caplog.text and "QUANTIZATION=8bit or 4bit" in caplog.text


def test_bitsandbytes_model_too_large_for_the_gpu_is_a_readable_error() -> None:
    error = ValueError(
        "Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU RAM to fit the "
        "quantized model.\nIf you want to dispatch the model on the CPU or the disk while keeping these modules..."
    )
    message = str(loading._readable_load_error("GoToCompany/x", error))
    assert "does not fit in GPU memory" in message and "QUANTIZATION=8bit or 4bit" in message
    assert "\n" not in message


# --- dtype ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_cuda", [False, True])
@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_dtype_setting_overrides(name: str, has_cuda: bool) -> None:
    assert resolve_dtype(make_settings(dtype=name), has_cuda) == getattr(torch, name)


@pytest.mark.parametrize(
    ("flags", "cpu_isa", "expected"),
    [
        ("avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16", "auto", torch.bfloat16),
        ("avx2 fma f16c avx512f avx512bw avx512vl amx_bf16 amx_tile", "auto", torch.bfloat16),
        ("avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16", "avx2", torch.float32),  # the cap rules
        ("avx2 fma f16c avx512f avx512bw avx512vl", "auto", torch.float32),  # AVX-512 without bf16
        ("avx2 fma f16c", "auto", torch.float32),  # AVX2 only (Zen 2/3 class)
        ("", "auto", torch.float32),  # no /proc/cpuinfo (not Linux) or an aarch64 CPU
    ],
)
def test_cpu_dtype_is_bf16_only_where_native(
    flags: str, cpu_isa: str, expected: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.cpu import paths as cpu_path

    monkeypatch.setattr(cpu_path, "cpu_flags", lambda: frozenset(flags.split()))
    assert resolve_dtype(make_settings(cpu_isa=cpu_isa), has_cuda=False) == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_dtype_is_bf16_where_supported(bf16: bool, expected: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_dtype(make_settings(), has_cuda=True) == expected


# --- models that cannot be loaded -----------------------------------------------------------------


def assert_one_readable_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert len(message) < 400
    assert "MODEL_ID" in message  # says what to set


@pytest.mark.parametrize("model_id", ["/nonexistent/model-dir", "./no-such-dir", "~/no-such-dir/x"])
def test_missing_directory(model_id: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model(make_settings(model_id=model_id))
    assert f"MODEL_ID={model_id} is not an existing directory" in str(caught.value)
    assert_one_readable_line(str(caught.value))


def test_directory_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(ModelLoadError, match=r"directory without config\.json") as caught:
        load_model(make_settings(model_id=str(tmp_path)))
    assert_one_readable_line(str(caught.value))


def test_directory_with_broken_weights(tiny_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes()[:64] if item.suffix == ".safetensors" else item.read_bytes())
    with pytest.raises(ModelLoadError) as caught:
        load_model(make_settings(model_id=str(broken)))
    assert str(caught.value).startswith(f"could not load model '{broken}'")
    assert_one_readable_line(str(caught.value))


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        load_model(make_settings(model_id="nobody-here/no-such-model-0123"))
    message = str(caught.value)
    assert message.startswith("could not load model 'nobody-here/no-such-model-0123'")
    assert "HF_HUB_OFFLINE=1" in message
    assert_one_readable_line(message)


def test_app_exits_with_a_short_message_when_the_model_cannot_load() -> None:
    env = {
        **os.environ,
        "MODEL_ID": "/nonexistent",
        "API_KEYS": "k-0123456789",
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    done = subprocess.run(
        [sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("start-up failed: MODEL_ID=/nonexistent is not an existing directory"), output
    assert len(output.strip().splitlines()) < 15, output


def test_importing_and_loading_on_cpu_never_imports_bitsandbytes(tiny_dir: Path) -> None:
    """The whole service imported, and a model loaded with QUANTIZATION=auto on a machine without CUDA."""
    script = (
        "import sys\n"
        "import app, webapp.server, inference\n"
        "from inference.model.loading import load_model\n"
        "from webapp.settings import Settings\n"
        "assert 'bitsandbytes' not in sys.modules, 'imported by the service'\n"
        f"loaded = load_model(Settings(model_id={str(tiny_dir)!r}, quantization='auto', _env_file=None))\n"
        "assert loaded.info.quantization == 'none', loaded.info\n"
        "assert 'bitsandbytes' not in sys.modules, 'imported by load_model'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# --- PACK_CPU_WEIGHTS -------------------------------------------------------------------------------


def greedy_reply(engine: Engine) -> GenerationResult:
    request = GenerationRequest(
        messages=(Message("user", "Sebutkan tiga pulau di Indonesia."),), max_new_tokens=12, temperature=0
    )
    return asyncio.run(engine.generate(request))


def test_pack_cpu_weights_off_serves_with_plain_linears(settings: Settings) -> None:
    """PACK_CPU_WEIGHTS=false (on the torch paths: GGUF_INT4=false here, as the native path packs nothing): the engine
    app.py builds loads plain `nn.Linear`s on the transformers path, and they give the same replies as the lean path's
    prepacked ones (bit for bit in bf16; float32's blocked sgemm may round a tie otherwise: then the same length)."""
    from inference.cpu.packed import PackedLinear, is_packed

    torch_paths = settings.model_copy(update={"gguf_int4": False})
    unpacked = build_engine(torch_paths.model_copy(update={"pack_cpu_weights": False}))
    unpacked.load()  # the service's own load (from the model cache the session warmed)
    try:
        assert isinstance(unpacked, LocalEngine) and unpacked.info is not None
        assert unpacked.info.decode_path == "transformers" and "PACK_CPU_WEIGHTS=false" in unpacked.cpu_path.reason
        linears = [m for m in unpacked.model.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is torch.nn.Linear and not is_packed(m) for m in linears)
        plain_reply = greedy_reply(unpacked)
    finally:
        unpacked.close()
    assert plain_reply.output_length == 12 and plain_reply.text.strip()

    # The default packs them (the lean path), and the packed model answers the same, token for token.
    packed = build_engine(torch_paths)
    packed.load()
    try:
        assert isinstance(packed, LocalEngine) and packed.info is not None and packed.info.decode_path == "lean"
        assert any(type(m) is PackedLinear for m in packed.model.modules())
        reply = greedy_reply(packed)
        if packed.info.dtype == "bfloat16":
            assert reply.text == plain_reply.text
        else:
            assert (
                reply.output_length == plain_reply.output_length
                and reply.text.split()[:3] == plain_reply.text.split()[:3]
            )
    finally:
        packed.close()
