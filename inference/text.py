"""Text helpers shared by every engine: stop-sequence matching on a stream of text pieces."""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Finds stop sequences in streamed text without ever emitting any part of a match.

    Text that could still be the start of a stop sequence is held back until the next piece decides it.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `stopped` once a stop sequence is seen."""
        if self.stopped:
            return ""
        self._pending += text
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
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
