"""Chunked prefill on transformers' forward path (PREFILL_CHUNK_TOKENS): a long prompt is prefilled a chunk per forward
pass, so its attention scores are chunk x prompt instead of prompt squared (issue 28: a 4,096-token prompt killed the
9B shape in 8-bit at its prefill). The chunked prefill must give the same tokens as the whole-prompt one.

Both local engines, on the tiny Gemma2 (sahabat-ai's architecture: its sliding-window layers, 16 columns here, are
shorter than the prompt) and on the embedded Llama with FAST_DECODE=false; float32, so the two ways of summing agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.engines.base import LocalEngine
from inference.model.loading import LoadedModel
from inference.types import GenerationRequest
from tests.helpers import engine_for, model_settings, on_a_loader_thread
from webapp.settings import Settings

CHUNK = 8
# ~90 tokens of plain text: eleven chunks, and several times the tiny Gemma2's sliding window.
PROMPT = " ".join(f"kalimat nomor {n} tentang pulau Jawa dan Sumatra." for n in range(9))


class WidestForward:
    """Records the widest `input_ids` any forward pass of `model` took (a spy on the real model, nothing replaced)."""

    def __init__(self, model: Any) -> None:
        self.widest = 0
        self._handle = model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.widest = max(self.widest, int(ids.shape[-1]))

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def gemma32(gemma_dir: Path) -> tuple[Settings, LoadedModel]:
    settings = model_settings(gemma_dir, dtype="float32")
    return settings, on_a_loader_thread(settings)


def request() -> GenerationRequest:
    return GenerationRequest(messages=(), prompt=PROMPT, max_new_tokens=6, temperature=0)


async def generate(settings: Settings, loaded: LoadedModel, kind: str, chunk: int) -> tuple[str, int, int]:
    """(text, prompt tokens, widest forward) of the greedy request on a fresh engine with PREFILL_CHUNK_TOKENS=chunk."""
    engine: LocalEngine = engine_for(
        settings.model_copy(update={"prefill_chunk_tokens": chunk, "fast_decode": False}), loaded, kind
    )
    spy = WidestForward(loaded.model)
    try:
        result = await engine.generate(request())
    finally:
        spy.close()
        engine.close()
    return result.text, result.input_length, spy.widest


def cases(gemma32: tuple[Settings, LoadedModel], settings: Settings, model32: LoadedModel) -> Iterator[Any]:
    yield "gemma2", *gemma32
    yield "llama", settings, model32


@pytest.mark.parametrize("kind", ["batched", "sequential"])
async def test_a_chunked_prefill_gives_the_whole_prompts_tokens(
    kind: str, gemma32: tuple[Settings, LoadedModel], settings: Settings, model32: LoadedModel
) -> None:
    for name, model_settings_, loaded in cases(gemma32, settings, model32):
        whole, prompt_tokens, widest_whole = await generate(model_settings_, loaded, kind, chunk=0)
        chunked, _, widest_chunked = await generate(model_settings_, loaded, kind, chunk=CHUNK)
        assert prompt_tokens > 8 * CHUNK, (name, prompt_tokens)
        assert widest_whole == prompt_tokens, (name, widest_whole)  # the prompt in one pass without chunking
        assert widest_chunked == CHUNK, (name, widest_chunked)  # never a forward wider than the chunk
        assert chunked == whole and whole, (name, chunked, whole)
