"""The embedded model's weight cache: the second load uses it, and a broken cache never breaks start-up."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import pytest

from inference import Message
from inference.model import loading as loading_module
from inference.model.cache import MANIFEST, WEIGHTS, CacheEntry
from inference.model.loading import LoadedModel, embedded_gguf_path, load_model, resolve_dtype
from inference.text.prompt import PromptBuilder, resolve_terminators
from webapp.settings import Settings

CONVERSATION = (Message("system", "Jawab singkat."), Message("user", "Apa ibu kota Indonesia?"))


def cache_settings(directory: Path, **overrides: Any) -> Settings:
    return Settings(model_id="embedded", model_cache_dir=directory, _env_file=None, **overrides)  # type: ignore[call-arg]


def greedy_text(loaded: LoadedModel, max_new_tokens: int = 16) -> tuple[list[int], str]:
    import torch

    prompt = PromptBuilder(loaded.tokenizer).build(CONVERSATION)
    with torch.no_grad():
        output = loaded.model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return prompt, loaded.tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)


def entry_for(settings: Settings) -> CacheEntry:
    return CacheEntry.for_gguf(settings.model_cache_dir, embedded_gguf_path(), resolve_dtype(settings, False))


def test_first_load_writes_the_cache_and_the_second_uses_it(tmp_path: Path) -> None:
    settings = cache_settings(tmp_path / "cache")
    first = load_model(settings)  # the real GGUF dequantisation
    assert not first.from_cache
    entry = entry_for(settings)
    assert entry.is_complete()
    assert not list(entry.root.glob(".tmp-*")), "the temp dir was renamed into place, not left behind"

    second = load_model(settings)
    assert second.from_cache
    assert second.info == first.info
    assert resolve_terminators(second.tokenizer) == resolve_terminators(first.tokenizer)
    first_prompt, first_text = greedy_text(first)
    second_prompt, second_text = greedy_text(second)
    assert second_prompt == first_prompt
    assert first_text and second_text == first_text
    assert second.model.lm_head.weight.data_ptr() == second.model.model.embed_tokens.weight.data_ptr(), "tied"


@pytest.fixture
def gguf_loads(monkeypatch: pytest.MonkeyPatch, embedded_model: LoadedModel) -> list[Path]:
    """Counts GGUF loads; the session's model stands in for the dequantisation (~15 s) these tests do not test."""
    calls: list[Path] = []

    def fake_load_gguf(gguf: Path, dtype: Any) -> tuple[Any, Any]:
        calls.append(gguf)
        return embedded_model.model, embedded_model.tokenizer

    monkeypatch.setattr(loading_module, "_load_gguf", fake_load_gguf)
    return calls


def truncate_weights(path: Path) -> None:
    weights = path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def garble_weights(path: Path) -> None:
    weights = path / WEIGHTS
    weights.write_bytes(b"\x00garbage" * (weights.stat().st_size // 8) + b"\x00" * (weights.stat().st_size % 8))


def drop_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def stale_key(path: Path) -> None:
    manifest = path / MANIFEST
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 0'))


@pytest.mark.parametrize("damage", [truncate_weights, garble_weights, drop_manifest, stale_key])
def test_a_broken_entry_falls_back_to_the_gguf_and_is_rewritten(
    tmp_path: Path, embedded_model: LoadedModel, gguf_loads: list[Path], damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = cache_settings(tmp_path)
    entry = entry_for(settings)
    assert entry.store(embedded_model.model, embedded_model.tokenizer)
    damage(entry.path)

    with caplog.at_level(logging.WARNING):
        loaded = load_model(settings)
    assert not loaded.from_cache and len(gguf_loads) == 1
    assert "reloading from the GGUF file" in caplog.text
    assert entry.is_complete(), "the entry was rewritten"
    assert load_model(settings).from_cache and len(gguf_loads) == 1


def test_a_leftover_partial_write_is_ignored(tmp_path: Path, gguf_loads: list[Path]) -> None:
    settings = cache_settings(tmp_path)
    partial = tmp_path / f".tmp-{entry_for(settings).name}-killed"
    partial.mkdir()
    (partial / WEIGHTS).write_bytes(b"half a file")
    assert not load_model(settings).from_cache
    assert load_model(settings).from_cache and len(gguf_loads) == 1


def test_an_unwritable_cache_dir_does_not_stop_loading(
    tmp_path: Path, gguf_loads: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    settings = cache_settings(blocker / "cache")
    with caplog.at_level(logging.WARNING):
        loaded = load_model(settings)
    assert not loaded.from_cache and loaded.info.model_id
    assert "could not write the model cache" in caplog.text
    assert loaded.info.decode_path == "native"  # its library is built in the temporary directory instead


def test_the_cache_can_be_switched_off(tmp_path: Path, gguf_loads: list[Path]) -> None:
    settings = cache_settings(tmp_path, model_cache=False)
    load_model(settings)
    load_model(settings)
    assert len(gguf_loads) == 2 and not any(tmp_path.iterdir())


def test_the_key_changes_with_dtype_and_file(tmp_path: Path) -> None:
    import torch

    gguf = embedded_gguf_path()
    bf16 = CacheEntry.for_gguf(tmp_path, gguf, torch.bfloat16)
    fp32 = CacheEntry.for_gguf(tmp_path, gguf, torch.float32)
    assert bf16.name != fp32.name
    copy = tmp_path / gguf.name
    copy.write_bytes(b"not the same file")
    assert CacheEntry.for_gguf(tmp_path, copy, torch.bfloat16).name != bf16.name


def test_the_key_changes_with_the_transformers_and_torch_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = cache_settings(tmp_path)
    names = {entry_for(settings).name}
    for package in ("transformers", "torch"):
        module = importlib.import_module(package)
        monkeypatch.setattr(module, "__version__", "99.0.0")  # what `pip install -U` would change
        entry = entry_for(settings)
        assert entry.key[package] == "99.0.0"
        names.add(entry.name)
    assert len(names) == 3


def test_an_upgrade_does_not_reuse_the_old_entry(
    tmp_path: Path, embedded_model: LoadedModel, gguf_loads: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    settings = cache_settings(tmp_path)
    assert entry_for(settings).store(embedded_model.model, embedded_model.tokenizer)
    assert load_model(settings).from_cache and not gguf_loads  # before the upgrade, the entry is used
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    loaded = load_model(settings)
    assert not loaded.from_cache and len(gguf_loads) == 1  # weights written under the old version are not reused
    assert entry_for(settings).is_complete()  # a new entry, for the new version
