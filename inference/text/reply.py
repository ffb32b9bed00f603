"""Text helpers shared by every engine: stop-sequence matching and the one consumer of a stream of text pieces."""

from __future__ import annotations

import time
from collections.abc import Iterable

from inference.types import FinishReason, GenerationResult, TextDelta, TokenLogprob


class StopMatcher:
    """Finds stop sequences in streamed text without ever emitting any part of a match.

    Text that could still be the start of a stop sequence is held back until the next piece decides it.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence seen (the earliest in the text; the first listed on a tie)

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `stopped` once a stop sequence is seen."""
        if self.stopped:
            return ""
        self._pending += text
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        hits = [(index, stop) for stop in self.stops if (index := self._pending.find(stop)) >= 0]
        if hits:
            first, self.matched = min(hits, key=lambda hit: hit[0])
            out, self._pending = self._pending[:first], ""
            self.stopped = True
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text, once the stream has ended without a match."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class ReplyAssembler:
    """One generation's reply as its text pieces arrive: the deltas to show, the time to first token, the result.

    Every engine (sequential, batched, remote) feeds it the decoded pieces in order and yields what `feed` returns;
    stop sequences are applied here (the remote engine passes none: its upstream applies them).

    With logprobs, the engine also hands over each token's `TokenLogprob` (`add_tokens`) no later than the piece that
    carries its text. Each token spans the characters of its text in the reply; it rides on the delta where its last
    character is shown, so a token whose text the detokenizer or the stop matcher holds back waits with it. At a stop
    sequence the tokens that show at least one character before the match are reported (the one holding the start of
    the match included) and the later ones are not; at the end of a stream without a stop every token is reported.
    """

    def __init__(self, stops: Iterable[str], started: float) -> None:
        self.matcher = StopMatcher(stops)
        self.started = started  # perf_counter() when the request was submitted
        self.parts: list[str] = []
        self.first_token_at: float | None = None
        self._tokens: list[tuple[int, int, TokenLogprob]] = []  # not yet reported: (start, end) in the reply's chars
        self._token_chars = 0  # the added tokens' text, in characters
        self._shown_chars = 0  # the deltas' text so far, in characters

    @property
    def stopped(self) -> bool:
        """A stop sequence was seen: the caller stops generating (nothing after it is shown)."""
        return self.matcher.stopped

    def add_tokens(self, tokens: Iterable[TokenLogprob]) -> None:
        """The logprobs of tokens just generated, in order; they ride on the delta that shows their text."""
        for token in tokens:
            start = self._token_chars
            self._token_chars += len(token.token)
            self._tokens.append((start, self._token_chars, token))

    def feed(self, piece: str) -> TextDelta | None:
        """The delta to show for `piece`, or None while the text could still be the start of a stop sequence."""
        return self._delta(self.matcher.feed(piece), final=self.matcher.stopped)

    def flush(self) -> TextDelta | None:
        """The held-back text, once the stream has ended without a stop sequence."""
        return self._delta(self.matcher.flush(), final=True)

    def _delta(self, text: str, final: bool) -> TextDelta | None:
        if text:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.parts.append(text)
            self._shown_chars += len(text)
        tokens = self._take_tokens(final)
        if not text and not tokens:
            return None
        return TextDelta(text, tokens)

    def _take_tokens(self, final: bool) -> tuple[TokenLogprob, ...]:
        if not self._tokens:
            return ()
        shown = self._shown_chars
        if final and self.matcher.stopped:  # nothing after the match is reported
            taken = [token for start, end, token in self._tokens if start < shown or end <= shown]
            self._tokens = []
        elif final:
            taken, self._tokens = [token for _, _, token in self._tokens], []
        else:
            cut = 0
            while cut < len(self._tokens) and self._tokens[cut][1] <= shown:
                cut += 1
            taken, self._tokens = [token for _, _, token in self._tokens[:cut]], self._tokens[cut:]
        return tuple(taken)

    def result(self, input_length: int, output_length: int, finish_reason: FinishReason) -> GenerationResult:
        """The totals that end the stream; the duration runs from `started` to now."""
        return GenerationResult(
            text="".join(self.parts),
            input_length=input_length,
            output_length=output_length,
            finish_reason=finish_reason,
            time_to_first_token_s=None if self.first_token_at is None else self.first_token_at - self.started,
            duration_s=time.perf_counter() - self.started,
            stop_sequence=self.matcher.matched,
        )
