"""Presence and frequency penalties: applied per row in the batched pass, and as a logits processor for the
sequential engine's `generate` (what a reported logprob sees: `logprobs.py`)."""

from __future__ import annotations

import collections
from typing import Any

from inference.types import GenerationRequest


def apply_penalties(scores: Any, counts: dict[int, int], request: GenerationRequest) -> Any:
    """OpenAI's penalties on one row (in place): `- (frequency * count + presence)` for each token generated so far.

    `counts`: how often each id was generated so far (the prompt excluded). Only those entries are touched, so the
    cost grows with the reply's distinct tokens, not with the vocabulary.
    """
    if not counts:
        return scores
    import torch

    ids = torch.tensor(list(counts), dtype=torch.long, device=scores.device)
    times = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
    scores.index_add_(0, ids, times * -request.frequency_penalty - request.presence_penalty)
    return scores


class PenaltyProcessor:
    """presence_penalty and frequency_penalty as a transformers LogitsProcessor (one row: generate's batch of 1)."""

    def __init__(self, request: GenerationRequest, prompt_length: int) -> None:
        self.request = request
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:

        generated = input_ids[0, self.prompt_length :].tolist()
        if not generated:
            return scores
        scores = scores.clone()
        apply_penalties(scores[0], dict(collections.Counter(generated)), self.request)
        return scores
