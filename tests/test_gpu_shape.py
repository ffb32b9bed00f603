"""bench/gpu_shape.py: its arithmetic, and its whole run on a tiny config on CPU, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gemma_shape import (
    SAHABAT_AI_SHAPE,
    build_tokenizer,
    eager_attention_peak_bytes,
    gemma2_config,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    parameter_count,
    weight_bytes,
)
from bench.gpu_shape import TABLE_BEGIN, TABLE_END, main
from tests.helpers import ROOT


def test_sahabat_ai_shape_is_gemma2_9b() -> None:
    config = gemma2_config(SAHABAT_AI_SHAPE)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (3584, 42, 14336)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 256)
    assert (config.vocab_size, config.sliding_window, config.max_position_embeddings) == (256000, 4096, 8192)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    counts = parameter_count(config)
    assert counts["total"] == 9_241_705_984  # Gemma2-9B's published 9.24B
    # The same count as torch's, on a meta-device model (no memory used).
    from transformers import Gemma2ForCausalLM

    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]


def test_memory_arithmetic() -> None:
    config = gemma2_config(SAHABAT_AI_SHAPE)
    assert weight_bytes(config, "none") == 2 * 9_241_705_984  # 18.48 GB in bf16
    # int8 decoder linears (8.32 GB) + bf16 embeddings (1.84 GB) + per-row scales: 10.17 GB, above the spec's 6-8 GB.
    assert 10.1e9 < weight_bytes(config, "8bit") < 10.2e9
    assert 6.4e9 < weight_bytes(config, "4bit") < 6.6e9
    assert kv_cache_bytes_per_token(config) == 344_064  # 336 KiB per token over 42 layers
    assert kv_cache_bytes(config, 8192) == 21 * 8192 * 8192 + 21 * 4095 * 8192 + 21 * 8192  # sliding layers keep 4096
    assert eager_attention_peak_bytes(config, 8192) == 8 * 16 * 8192 * 8192


def test_tokenizer_covers_the_full_vocabulary() -> None:
    tokenizer = build_tokenizer(256000)
    assert len(tokenizer) == 256000
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>"]) == [0, 1, 2, 3]
    assert tokenizer.decode([255999]).strip()  # every id a random 256000-vocab model emits decodes to text


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would build the real 9B shape")
def test_full_shape_without_cuda_skips_with_a_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU: GPU-only steps" in out and "nothing measured" in out
    assert "| weights, computed (GB) | 10.17 | 18.48 |" in out


def test_script_runs_as_a_file() -> None:
    """`python bench/gpu_shape.py` finds the repository's packages on its own (no torch import needed for --help)."""
    done = subprocess.run(
        [sys.executable, "bench/gpu_shape.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "--tiny" in done.stdout, done.stdout + done.stderr


def test_tiny_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole script on a tiny Gemma2: build, load through load_model, measure, table, JSON, --fill.

    In-process (the test session has torch and transformers imported already) to keep it to seconds.
    """
    notes = tmp_path / "notes.md"
    notes.write_text(f"before\n{TABLE_BEGIN}\n(placeholder)\n{TABLE_END}\nafter\n")
    report = tmp_path / "results.json"
    args = ["--tiny", f"--model-dir={tmp_path / 'model'}", f"--json={report}", f"--fill={notes}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| | 8-bit (QUANTIZATION=8bit) | bf16 (QUANTIZATION=none) |" in out
    results = json.loads(report.read_text())["results"]
    bf16 = results["none"]
    assert bf16["info"]["quantization"] == "none"
    assert bf16["load_s"] > 0
    for length in (32, 128):
        run = bf16[f"prompt_{length}"]
        assert length - 8 <= run["prompt_tokens"] <= length  # the prompt builder hit the asked length
        assert 0 < run["output_tokens"] <= 4
        assert run["first_token_s"] > 0
    assert bf16["concurrent"]["requests"] == 8
    assert bf16["concurrent"]["aggregate_tok_s"] > 0
    assert results["8bit"]["info"]["quantization"] == "8bit"  # bitsandbytes on CPU too
    assert results["8bit"]["concurrent"]["requests"] == 8
    if torch.cuda.is_available():
        assert bf16["after_load_gb"] > 0
    filled = notes.read_text()
    assert "(placeholder)" not in filled and "| load time (s) |" in filled
    assert filled.startswith("before\n") and filled.endswith(f"{TABLE_END}\nafter\n")
    # A second run reuses the model directory instead of writing it again.
    assert main([*args[:2], "--build-only"]) == 0
    assert "reusing the random model" in capsys.readouterr().out
