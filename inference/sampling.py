"""Choosing each row's next token from its logits, for both local engines.

The sequential engine hands `GREEDY_BELOW_TEMPERATURE` to transformers' `generate`; the batched engine samples
per row here, on the float32 logits, in the order `generate` uses: repetition penalty, temperature, top-k, top-p.
Greedy rows take the argmax. Each request has its own `torch.Generator`, so a seeded request samples the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from inference.grammar import apply_masks
from inference.types import GenerationRequest

# Temperatures below this decode greedily: dividing logits by a subnormal temperature (5e-324 is valid
# JSON and within 0..2) overflows to inf and the sampler raises on the NaN probabilities.
GREEDY_BELOW_TEMPERATURE = 1e-5


class SampledRow(Protocol):
    """What `choose` needs of a row (the batched engine's `Slot`)."""

    request: GenerationRequest
    history: list[int]  # prompt + output ids, kept for repetition_penalty only (else empty)
    generator: Any  # torch.Generator, made here at the row's first sample
    grammar: Any  # inference.grammar.RowGrammar for a constrained row (response_format), else None

    @property
    def greedy(self) -> bool: ...


def choose(slots: Sequence[SampledRow], logits: Any) -> Any:
    """The next token of every row: greedy rows take the argmax, the others sample with their own generator."""
    import torch

    scores = logits.float()
    constrained = [(row, slot.grammar) for row, slot in enumerate(slots) if slot.grammar is not None]
    if constrained:  # response_format: the grammar's mask first, so the sampling knobs see only allowed tokens
        apply_masks(scores, constrained)
    for row, slot in enumerate(slots):
        penalty = slot.request.repetition_penalty
        if penalty is not None and penalty != 1.0 and slot.history:
            seen = torch.tensor(slot.history, device=scores.device)
            picked = scores[row].gather(0, seen)
            picked = torch.where(picked < 0, picked * penalty, picked / penalty)
            scores[row].scatter_(0, seen, picked)
    tokens = scores.argmax(dim=-1)
    for row, slot in enumerate(slots):
        if slot.greedy:
            continue
        if slot.generator is None:
            slot.generator = torch.Generator(device=scores.device)
            if slot.request.seed is not None:
                slot.generator.manual_seed(slot.request.seed)
            else:
                slot.generator.seed()
        tokens[row] = sample(scores[row], slot.request, slot.generator)
    return tokens


def sample(scores: Any, request: GenerationRequest, generator: Any) -> Any:
    """One token from one row of logits: temperature, top-k, top-p (as transformers' warpers), then a draw."""
    import torch

    if request.temperature != 1.0:
        scores = scores / request.temperature
    if request.top_k is not None and request.top_k > 0:
        k = min(request.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if request.top_p is not None and request.top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - request.top_p)
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, sorted_index, remove), -math.inf)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
