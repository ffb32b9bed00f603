"""Per-request token logprobs, for both local engines (the penalties they follow: `penalties.py`).

What a reported logprob is: the natural-log softmax of the row's logits AFTER the request's penalties
(`repetition_penalty`, then `presence_penalty` and `frequency_penalty`) and BEFORE temperature, top-k, top-p and
min_p. Without penalties this is the model's own distribution (vLLM's default, raw logprobs); it does not depend on
the temperature, so a greedy and a sampled request over the same text report the same numbers. Both engines compute
it from the same float32 scores in the same order, so a greedy request reports the same values on either.

- Batched engine: `sampler.choose` applies `apply_penalties` to the rows that ask (their generated-token counts
  live on the row, `Slot.counts`) and `score` to the rows with logprobs; the decode thread posts a
  `ScoredToken` instead of a bare token id for those rows.
- Sequential engine: `PenaltyProcessor` and `LogprobRecorder` are logits processors handed to `generate` (transformers
  runs them after its repetition penalty and before its temperature/top-k/top-p/min_p warpers), and `LogprobStreamer`
  pairs each recorded step with the token `generate` chose, before that token's text reaches the consumer.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Any

from inference.types import TokenLogprob

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ScoredToken:
    """A generated token id with its logprob and the top alternatives (ids), as the decode thread posts it."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def score(scores: Any, token: int, top: int) -> ScoredToken:
    """The logprob of `token` under one row's (penalised) scores, with the `top` most likely alternatives."""
    import torch

    logprobs = torch.log_softmax(scores.float(), dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return ScoredToken(token, float(logprobs[token]), alternatives)


def token_logprob(tokenizer: Any, scored: ScoredToken) -> TokenLogprob:
    """The client's view of a scored token: ids decoded to text, each token alone (memoised per tokenizer)."""
    texts = _TOKEN_TEXTS.setdefault(id(tokenizer), {})
    if len(texts) > 65536:
        texts.clear()

    def text(token: int) -> str:
        found = texts.get(token)
        if found is None:
            found = texts[token] = tokenizer.decode([token], skip_special_tokens=False)
        return found

    return TokenLogprob(
        token=text(scored.token),
        logprob=scored.logprob,
        top=tuple((text(token), logprob) for token, logprob in scored.top),
    )


_TOKEN_TEXTS: dict[int, dict[int, str]] = {}  # id(tokenizer) -> token id -> its text (one tokenizer per process)


# ---- the sequential engine: logits processors for transformers' generate --------------------------------------


class LogprobRecorder:
    """Keeps the last step's (penalised) scores; `LogprobStreamer` scores them once `generate` has chosen."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.scores: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.scores = scores[0].detach().clone()
        return scores


@functools.cache
def _logprob_streamer_class() -> type:
    from transformers import AsyncTextIteratorStreamer

    class LogprobStreamer(AsyncTextIteratorStreamer):
        """The sequential engine's streamer, plus each generated token's logprob, recorded before its text is sent.

        `tokens` (a thread-safe deque) gets a TokenLogprob per generated token (terminators excluded), appended before
        `put` hands the token's text on, so the consumer always has a token's logprob when its text arrives.
        """

        def __init__(self, tokenizer: Any, recorder: LogprobRecorder, terminators: Any) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.recorder = recorder
            self.terminators = frozenset(terminators)
            self.tokens: collections.deque[TokenLogprob] = collections.deque()

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt and self.recorder.scores is not None:
                token = int(value.reshape(-1)[0])
                if token not in self.terminators:
                    scored = score(self.recorder.scores, token, self.recorder.top)
                    self.tokens.append(token_logprob(self.tokenizer, scored))
                self.recorder.scores = None
            super().put(value)

        def take(self) -> list[TokenLogprob]:
            out = []
            while self.tokens:
                out.append(self.tokens.popleft())
            return out

    return LogprobStreamer


def logprob_streamer(tokenizer: Any, recorder: LogprobRecorder, terminators: Any) -> Any:
    return _logprob_streamer_class()(tokenizer, recorder, terminators)
