"""Stop strings for a stream: text that might begin a stop string is held back until it is decided."""

from __future__ import annotations


class StopFilter:
    def __init__(self, stops: list[str]):
        self._stops = stops
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self._stops for k in range(1, min(len(s), len(self._pending) + 1))
                    if self._pending.endswith(s[:k])), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
