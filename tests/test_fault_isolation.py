"""Fault isolation in the batched engine: when a shared pass fails, its rows are run again in halves, and only the row
that fails alone ends with an error; the others go on to their last token, with the text they get alone.

On both kinds of pass: the lean one (the native path: the running rows and the prompts in one pass) and transformers'
forward (FAST_DECODE=false, as Gemma2 and bitsandbytes models run), a prefill and a decoding step. On each, a row's
greedy text does not depend on what else is in its batch: the native path computes each row on its own, and
transformers' forward runs the float32 copy.
"""

from __future__ import annotations

import asyncio

import pytest

from inference.model.loading import LoadedModel
from inference.types import GenerationFailed, GenerationRequest, GenerationResult
from tests.helpers import ForcedFault, chat_request, engine_for
from webapp.settings import Settings

BOOM_LATER = "MELEDAK-NANTI"  # fails once it has generated 3 tokens
BOOM = "MELEDAK-SEKARANG"  # fails at its prompt
PROMPTS = [f"Ceritakan tentang kota nomor {i} di Indonesia." for i in range(5)]
TOKENS = 12


def request(text: str) -> GenerationRequest:
    return chat_request(("user", text), max_new_tokens=TOKENS)


@pytest.mark.parametrize("fast_decode", [True, False], ids=["lean-pass", "transformers-forward"])
@pytest.mark.parametrize("marker,after", [(BOOM_LATER, 3), (BOOM, 0)], ids=["mid-stream", "at-prefill"])
async def test_only_the_failing_row_fails(
    fast_decode: bool, marker: str, after: int, settings: Settings, embedded_model: LoadedModel, model32: LoadedModel
) -> None:
    loaded = embedded_model if fast_decode else model32
    engine = engine_for(settings.model_copy(update={"fast_decode": fast_decode}), loaded)
    try:
        assert (engine.lean_pass is not None) == fast_decode
        alone = [(await engine.generate(request(text))).text for text in PROMPTS]
        engine.runner.max_rows_seen = 0
        with ForcedFault(engine, marker, after=after):
            texts = [*PROMPTS[:2], f"{marker} apa kabar?", *PROMPTS[2:]]
            results = await asyncio.gather(*(engine.generate(request(text)) for text in texts), return_exceptions=True)
        failing = results.pop(2)
        assert isinstance(failing, GenerationFailed), failing
        assert all(isinstance(result, GenerationResult) for result in results), results
        assert [result.text for result in results] == alone
        assert [result.output_length for result in results] == [TOKENS] * len(PROMPTS)
        assert engine.runner.max_rows_seen >= 4  # they did share passes
        assert engine.running == 0 and engine.queue_depth == 0
        assert (await engine.generate(request(PROMPTS[0]))).text == alone[0]  # and the engine goes on
    finally:
        engine.close()
