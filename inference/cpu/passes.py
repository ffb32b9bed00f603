"""The parts of one forward pass of the batched engine's lean loop: decoding rows and prompt chunks.

Plain data shared by the two lean passes, the native one (inference/cpu/native_forward.py) and the torch one
(inference/cpu/lean_forward.py), and filled by the decode thread (inference/engines/batched/runner.py); `LeanPass`
is what the decode thread asks of either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class DecodeRows:
    """Rows generating one token each over a shared, right-aligned cache (the batched engine's running batch)."""

    tokens: Any  # (rows,) torch long: each row's next input token
    positions: Any  # (rows,) its position id
    mask: Any  # (rows, columns): 1 for real tokens, 0 for left padding; the new token's column included
    cache: Any  # the transformers cache the rows share (columns - 1 long)


@dataclass
class PromptRow:
    """A prompt, unpadded, prefilled into a cache of its own: whole, or a chunk `ids[start:end]` per pass."""

    ids: Any  # (length,) torch long: the whole prompt
    cache: Any  # a transformers cache (engines/batched/kv_cache.py new_cache) holding the prompt's first `start` tokens
    start: int = 0
    end: int | None = None  # None: to the end of the prompt

    def span(self) -> tuple[int, int]:
        end = int(self.ids.shape[0]) if self.end is None else self.end
        if not 0 <= self.start < end <= self.ids.shape[0]:
            raise ValueError(f"bad prompt chunk {self.start}:{end} of {int(self.ids.shape[0])} tokens")
        return self.start, end


class LeanPass(Protocol):
    """One forward pass over the running rows and prompt chunks together: the next-token logits of the decoding rows
    (rows, vocab) and of each prompt chunk's last token (prompts, vocab); None for a part the pass did not have."""

    def forward(self, decode: DecodeRows | None, prompts: Sequence[PromptRow]) -> tuple[Any, Any]: ...
