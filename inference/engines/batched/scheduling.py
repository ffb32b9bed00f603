"""Pass planning for the batched engine: how many rows, which prompts prefill together, which prompt chunks ride a pass.

Pure functions and the measured constants they use; the decode thread (`inference.engines.batched.runner`) calls them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

# The constants below were measured on a 2-core CPU with the embedded model; the figures and the runs that chose
# them are in docs/cpu-paths.md#the-measurements-behind-the-code.
# Prefill batching (plan_prefill_groups): a pass's fixed cost in prompt-token equivalents (a guess for GPUs, where
# it dwarfs the per-token one); the budget caps the padded tokens of one prefill pass. MAX_BATCH=auto: 16 rows on a
# CPU, 8 on a GPU, where each row's KV cache takes GPU memory.
AUTO_MAX_BATCH_CPU = 16
AUTO_MAX_BATCH_ACCELERATOR = 8
PREFILL_OVERHEAD_TOKENS_CPU = 100
PREFILL_OVERHEAD_TOKENS_ACCELERATOR = 1000
PREFILL_TOKEN_BUDGET = 8192
# Lean passes carry the running rows and prompt chunks together; this caps a pass's prompt tokens, so a long prompt
# is prefilled over several passes while the running streams keep getting tokens (chunked prefill), and a burst of
# ordinary chat prompts still joins in one pass.
PASS_PROMPT_TOKENS = 1024


class PrefillingRow(Protocol):
    prompt_ids: list[int]
    prefilled: int  # prompt tokens already in the row's prompt cache


RowT = TypeVar("RowT", bound=PrefillingRow)


def plan_prefill_groups(lengths: list[int], overhead: int, budget: int) -> list[list[int]]:
    """Split prompts (by index) into left-padded prefill batches that cost the least.

    A batch costs `overhead` (a forward pass's fixed cost, in prompt-token equivalents) plus rows x its
    longest prompt (padding included), and holds at most `budget` padded tokens unless it is one prompt
    (this bounds the prefill's activation memory). Prompts are sorted by length, so the best split is
    into contiguous runs (an O(n^2) dynamic programme); groups come shortest first, so short prompts see
    their first token soonest.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):
            padded = (end - start) * sorted_lengths[end - 1]
            if padded > budget and end - start > 1:
                break
            cost = best[start] + overhead + padded
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def plan_prompt_chunks(prefilling: Sequence[RowT], budget: int) -> list[tuple[RowT, int]]:
    """The prompt chunks of the next lean pass, as (row, end), at most `budget` tokens in all.

    Shortest remaining prompt first, each whole while it fits. A prompt longer than the budget is split over
    passes (chunked prefill), but only in a pass that completes no other prompt: a chunk riding along would
    delay those prompts' first tokens for nothing (its own first token is passes away anyway).
    """
    chunks: list[tuple[RowT, int]] = []
    for slot in sorted(prefilling, key=lambda s: len(s.prompt_ids) - s.prefilled):
        remaining = len(slot.prompt_ids) - slot.prefilled
        if remaining <= budget:
            chunks.append((slot, len(slot.prompt_ids)))
            budget -= remaining
        else:
            if not chunks:
                chunks.append((slot, slot.prefilled + budget))
            break
    return chunks
