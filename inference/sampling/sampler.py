"""Choosing each row's next token from its logits, for both local engines.

The sequential engine hands `GREEDY_BELOW_TEMPERATURE` to transformers' `generate`; the batched engine samples
per row here, on the float32 logits, in the order `generate` uses: repetition penalty, (presence and frequency
penalties, `penalties.py`), temperature, top-k, top-p, min_p. Greedy rows take the argmax. Rows with logprobs
are scored after the penalties (`logprobs.score`); rows without any of these take the plain path.
Each request has its own `torch.Generator`, so a seeded request samples the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from inference.sampling.grammar import apply_masks
from inference.sampling.logprobs import score
from inference.sampling.penalties import apply_penalties
from inference.types import GenerationRequest

# Temperatures below this decode greedily: dividing logits by a subnormal temperature (5e-324 is valid
# JSON and within 0..2) overflows to inf and the sampler raises on the NaN probabilities.
GREEDY_BELOW_TEMPERATURE = 1e-5


def uses_penalties(request: GenerationRequest) -> bool:
    """Whether a request asks for presence or frequency penalties (only those rows enter `penalties.py`)."""
    return bool(request.presence_penalty) or bool(request.frequency_penalty)


class SampledRow(Protocol):
    """What `choose` needs of a row (the batched engine's `Slot`)."""

    request: GenerationRequest
    history: list[int]  # prompt + output ids, kept for repetition_penalty only (else empty)
    generator: Any  # torch.Generator, made here at the row's first sample
    counts: Any  # {id: times generated}, for presence/frequency penalties only (else None)
    scored: Any  # inference.sampling.logprobs.ScoredToken of the last choice, for rows with logprobs only
    grammar: Any  # inference.sampling.grammar.RowGrammar for a constrained row (response_format), else None

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
        if uses_penalties(slot.request):
            if slot.counts is None:  # the row's first choice: nothing generated yet
                slot.counts = {}
            apply_penalties(scores[row], slot.counts, slot.request)
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
    for row, slot in enumerate(slots):
        if slot.request.logprobs is not None:
            slot.scored = score(scores[row], int(tokens[row]), slot.request.logprobs)
    return tokens


def sample(scores: Any, request: GenerationRequest, generator: Any) -> Any:
    """One token from one row of logits: temperature, top-k, top-p, min_p (as transformers' warpers), then a draw."""
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
    if request.min_p:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < request.min_p * probs.max(), -math.inf)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
