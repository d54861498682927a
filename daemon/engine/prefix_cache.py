"""Keys and values of recently seen prompts, so a request sharing a long prefix with an earlier one (a system
prompt, retrieved passages) skips recomputing it. Bounded in bytes; least recently used entries go first."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class PrefixCache:
    """Shared by every request on a model, from several threads: one lock guards the entries."""

    def __init__(self, max_bytes: int, min_tokens: int = 32):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], list[np.ndarray]] = OrderedDict()  # (space, ids)
        self._lock = threading.Lock()
        self.bytes = 0

    @staticmethod
    def _size(arrays: list[np.ndarray]) -> int:
        return sum(a.nbytes for a in arrays)

    def lookup(self, ids: list[int], space: str = "") -> tuple[int, list[np.ndarray]] | None:
        """The longest cached prefix of `ids` (leaving at least one token to compute), as fresh arrays, among
        the entries stored in `space` (keys and values made with one LoRA adapter suit no other)."""
        best, best_key = 0, None
        query = np.asarray(ids)
        with self._lock:
            for entry in self._entries:
                entry_space, key = entry
                n = min(len(key), len(ids) - 1)
                if entry_space != space or n <= best:
                    continue
                differs = np.flatnonzero(np.asarray(key[:n]) != query[:n])
                common = int(differs[0]) if len(differs) else n
                if common > best:
                    best, best_key = common, entry
            if best_key is None or best < self.min_tokens:
                return None
            self._entries.move_to_end(best_key)
            found = self._entries[best_key]
        return best, [np.ascontiguousarray(a[:, :, :best, :]) for a in found]  # entries are never written to

    def store(self, ids: list[int], arrays: list[np.ndarray], space: str = "") -> None:
        """Keep the prompt's keys and values (arrays the decoder will not write to again)."""
        key = (space, tuple(ids))
        size = self._size(arrays)
        if len(ids) < self.min_tokens or size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = arrays
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= self._size(old)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
