"""The memory pre-check: the weights' size per QUANTIZATION from the config, against an injected free-memory figure.

A directory holding only sahabat-ai's config.json (bench.gemma_shape.SAHABAT_AI_SHAPE) is enough: the check runs
before the tokenizer or any weight is read, so a refused load never touches the (absent) 18 GB of weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from bench.gemma_shape import SAHABAT_AI_SHAPE, TINY_SHAPE, gemma2_config, weight_bytes, write_model_dir
from inference.cpu.paths import native_bf16
from inference.model import loading, memory
from inference.model.loading import load_model
from inference.types import ModelLoadError
from tests.helpers import model_settings
from webapp.settings import Settings

GB = 1e9
# The dtype the CPU in force loads sahabat-ai's shape in (bf16 where bf16 matmuls are native, else float32), and
# whether its linears get a prepacked copy then (bf16 only: a float32 Gemma2 keeps one copy): the figures below are
# written for each (measured with memory.options, whose arithmetic test_weight_estimate_matches_the_9b_arithmetic
# checks against bench.gemma_shape's).
BF16 = native_bf16(Settings(_env_file=None).cpu_isa)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def nine_b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sahabat-ai-config-only")
    gemma2_config(SAHABAT_AI_SHAPE).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def nine_b_counts() -> memory.WeightCounts:
    return memory.count_weights(gemma2_config(SAHABAT_AI_SHAPE))


def inject(monkeypatch: pytest.MonkeyPatch, available: float, where: str = "available RAM") -> list[bool]:
    """Make load_model see `available` bytes; returns a list that records each call's has_cuda."""
    calls: list[bool] = []

    def fake(has_cuda: bool) -> tuple[int, str]:
        calls.append(has_cuda)
        return int(available), where

    monkeypatch.setattr(loading, "available_memory", fake)
    return calls


def refusal(settings: Settings) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_model(settings)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"model {settings.model_id!r} needs about ")
    return message


def test_weight_estimate_matches_the_9b_arithmetic(nine_b_counts: memory.WeightCounts) -> None:
    config = gemma2_config(SAHABAT_AI_SHAPE)
    for quantization in ("none", "8bit", "4bit"):
        assert memory.weight_bytes(nine_b_counts, quantization) == weight_bytes(config, quantization)
    assert nine_b_counts.head == 256000 * 3584  # the tied head, packed once on CPU
    packed = memory.weight_bytes(nine_b_counts, "none", packed_copies=True)
    assert packed == 2 * 9_241_705_984 + 2 * (nine_b_counts.quantizable + nine_b_counts.head)  # ~37 GB
    assert memory.weight_bytes(nine_b_counts, "8bit", packed_copies=True) == weight_bytes(config, "8bit") + 2 * (
        256000 * 3584
    )


def test_bf16_that_does_not_fit_names_the_quantization_that_does(
    nine_b_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    inject(monkeypatch, 16 * GB)
    with caplog.at_level(logging.INFO, logger="inference.model.loading"):
        message = refusal(model_settings(nine_b_dir, quantization="none"))
    # bf16 with the prepacked copies: 37 GB of weights + reserve; without them 18.5 GB: neither fits in 16 GB.
    # float32 (no native bf16): 37 GB without prepacked copies.
    assert "needs about 39.9 GB with QUANTIZATION=none" in message
    assert "only 16.0 GB of available RAM is left" in message
    assert "set QUANTIZATION=8bit (about 13.7 GB)" in message
    assert "memory check:" in caplog.text  # the log says the numbers for a load that goes ahead as well


def test_prepacking_is_dropped_first_when_that_is_enough(nine_b_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, 22 * GB)
    message = refusal(model_settings(nine_b_dir, quantization="none"))
    if BF16:
        assert "set QUANTIZATION=none PACK_CPU_WEIGHTS=false (about 20.5 GB)" in message
    else:  # float32: nothing is prepacked, so 8-bit is the next step down
        assert "set QUANTIZATION=8bit (about 13.7 GB)" in message and "PACK_CPU_WEIGHTS" not in message


def test_8bit_that_does_not_fit_names_4bit(nine_b_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    available, needs, fits = (9, "11.7", "7.9") if BF16 else (10, "13.7", "9.8")  # float32 keeps 3.7 GB more
    inject(monkeypatch, available * GB)
    message = refusal(model_settings(nine_b_dir, quantization="8bit", pack_cpu_weights=False))
    assert f"needs about {needs} GB with QUANTIZATION=8bit" in message and f"only {available}.0 GB" in message
    assert f"set QUANTIZATION=4bit (about {fits} GB)" in message


def test_nothing_fits(nine_b_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inject(monkeypatch, 4 * GB)
    message = refusal(model_settings(nine_b_dir, quantization="4bit"))
    smallest = (
        "QUANTIZATION=4bit PACK_CPU_WEIGHTS=false needs about 7.9 GB"
        if BF16
        else "QUANTIZATION=4bit needs about 9.8 GB"
    )
    assert f"nothing fits ({smallest})" in message


def test_on_cuda_free_gpu_memory_is_the_measure(nine_b_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "cuda_available", lambda: True)
    monkeypatch.setattr(loading, "ensure_bitsandbytes", lambda quantization: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    calls = inject(monkeypatch, 8 * GB, "free GPU memory")
    message = refusal(model_settings(nine_b_dir, quantization="auto"))
    assert calls == [True]
    # The spec's "VRAM 6-8 GB with 8-bit" GPU: no prepacking on CUDA, 4-bit fits.
    assert "needs about 11.7 GB with QUANTIZATION=8bit" in message and "8.0 GB of free GPU memory" in message
    assert "set QUANTIZATION=4bit (about 7.9 GB)" in message


def test_memory_check_false_skips_it(nine_b_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = inject(monkeypatch, 1 * GB)
    with pytest.raises(ModelLoadError) as caught:  # goes on to read the (absent) tokenizer and weights
        load_model(model_settings(nine_b_dir, quantization="8bit", memory_check=False))
    assert calls == [] and str(caught.value).startswith("could not load model")


def test_a_model_that_fits_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_model_dir(tmp_path / "tiny", gemma2_config(TINY_SHAPE))
    counts = memory.count_weights(gemma2_config(TINY_SHAPE))
    needs = memory.required_bytes(memory.weight_bytes(counts, "none", 2 if BF16 else 4, packed_copies=BF16))
    calls = inject(monkeypatch, needs)  # exactly enough
    assert load_model(model_settings(directory)).info.quantization == "none"
    assert calls == [False]
    inject(monkeypatch, needs - 1)
    expected = "set QUANTIZATION=none PACK_CPU_WEIGHTS=false" if BF16 else "set QUANTIZATION=8bit"
    assert expected in refusal(model_settings(directory))


def test_available_memory_reads_ram_and_a_cgroup_limit(tmp_path: Path) -> None:
    available, where = memory.available_bytes(has_cuda=False)
    assert available > 0 and where in ("available RAM", "memory left under this container's limit")
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert memory.cgroup_available_bytes(tmp_path) == 3 * 1024**3
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_available_bytes(tmp_path) is None
    assert memory.cgroup_available_bytes(tmp_path / "absent") is None
