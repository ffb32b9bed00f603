"""bench/cpu_shape.py on a tiny Gemma2: shard writing, the service's load path, every measurement, clean-up."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from bench import cpu_shape
from bench.gemma_shape import SAHABAT_AI_SHAPE, TINY_SHAPE, gemma2_config, parameter_count
from inference.model import loading
from tests.helpers import ROOT


def test_shards_hold_exactly_the_models_tensors(tmp_path: Path) -> None:
    config = gemma2_config(TINY_SHAPE)
    written = cpu_shape.write_checkpoint(tmp_path / "ckpt", config, shard_bytes=60_000)
    assert written["shards"] > 1  # the tiny model still goes out in several shards
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    counted = 0
    for filename in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "ckpt" / filename), "pt") as shard:
            counted += sum(math.prod(shard.get_slice(name).get_shape()) for name in shard.keys())  # noqa: SIM118
    assert counted == parameter_count(config)["total"]  # tied output layer stored once, like save_pretrained
    assert written["bytes"] == 2 * counted == index["metadata"]["total_size"]
    template = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text()).get("chat_template", "")
    template = template or (tmp_path / "ckpt" / "chat_template.jinja").read_text()
    assert "System role not supported" in template  # the real Gemma2 template


def test_the_9b_shape_is_written_from_the_exact_config() -> None:
    specs = cpu_shape.tensor_specs(gemma2_config(SAHABAT_AI_SHAPE))
    assert sum(math.prod(shape) for _, shape in specs) == 9_241_705_984
    assert max(2 * math.prod(shape) for _, shape in specs) < 2_000_000_000  # fits one 2 GB shard


def test_tiny_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text(f"before\n{cpu_shape.TABLE_BEGIN}\n(placeholder)\n{cpu_shape.TABLE_END}\nafter\n")
    report = tmp_path / "results.json"
    model_dir = tmp_path / "model"
    args = ["--tiny", "--same-process", f"--model-dir={model_dir}", "--modes=8bit,4bit", f"--json={report}"]
    args.append("--conversation-modes=4bit")
    assert cpu_shape.main([*args, f"--fill={notes}"]) == 0
    assert not model_dir.exists()  # cleaned up
    results = json.loads(report.read_text())["results"]
    for mode in ("8bit", "4bit"):
        run = results[mode]
        assert run["info"]["quantization"] == mode and run["info"]["engine"] == "batched"
        assert run["precheck"]["refused"] is None and run["precheck"]["needs"] > 0
        assert run["load_s"] > 0
        assert run["load_peaks"]["RssAnon"] > 0 and run["load_peaks"]["RssFile"] > 0
        assert run["ready"]["VmRSS"] >= run["ready"]["RssAnon"]
        assert 24 <= run["single"]["prompt_tokens"] <= 32 and run["single"]["output_tokens"] == 4
        assert run["streams"]["streams"] == 4 and run["streams"]["rows_seen"] >= 2
        [conversation] = run["conversations"]
        if mode == "8bit":
            assert conversation == {"tokens": 128, "skipped": "not asked (--conversation-modes)"}
            continue
        assert conversation["turns"] >= 5  # a real multi-turn conversation
        assert 112 <= conversation["total_tokens"] <= 128
        assert conversation["after"]["RssAnon"] > 0
    table = capsys.readouterr().out
    assert "| | 8-bit (`QUANTIZATION=8bit`) | 4-bit nf4 (`QUANTIZATION=4bit`) |" in table
    assert "| peak RssAnon while loading (GB) |" in table
    filled = notes.read_text()
    assert "(placeholder)" not in filled and "| decode tok/s, 4 concurrent streams (aggregate) |" in filled


def test_a_mode_the_pre_check_refuses_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "available_memory", lambda has_cuda: (100_000_000, "available RAM"))
    report = tmp_path / "results.json"
    args = ["--tiny", "--same-process", f"--model-dir={tmp_path / 'model'}", "--modes=none", f"--json={report}"]
    assert cpu_shape.main(args) == 0
    run = json.loads(report.read_text())["results"]["none"]
    assert run["skipped"] == "refused by the memory pre-check"
    assert "only 0.1 GB of available RAM is left" in run["precheck"]["refused"]
    assert "load_s" not in run  # never loaded


def test_shards_never_go_inside_the_repository() -> None:
    with pytest.raises(SystemExit, match="inside the repository"):
        cpu_shape.main(["--tiny", f"--model-dir={ROOT / 'bench' / '_build' / 'x'}"])


def test_script_runs_as_a_file() -> None:
    done = subprocess.run(
        [sys.executable, "bench/cpu_shape.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--tiny" in done.stdout, done.stdout + done.stderr
