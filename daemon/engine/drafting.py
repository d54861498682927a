"""Drafts for speculative decoding, taken from the text a sequence already holds (prompt lookup).

What edgellm is mostly asked for copies its input: a field out of a document, a sentence of a retrieved
passage, an argument out of the request. Where the output's last few tokens also occur earlier in the prompt
or the output, the tokens that followed them there are a good guess of what comes next. One forward pass
over the guess checks all of it (Sequence.fed keeps the longest prefix the model itself samples), and a pass
over a few tokens costs little more than a pass over one: on 2 threads a SmolLM2 pass of 4 tokens takes
about 1.6x one of 1 (docs/measured-facts.md, "Speculative decoding"). Nothing is trained or loaded: a draft
is a search over token ids.

How far to guess follows what was accepted (`Speculation`): a draft accepted whole doubles the next one, a
miss shrinks it, and repeated misses back off for a growing number of steps, so free text with nothing to
copy pays for a draft only now and then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

NGRAM_MAX, NGRAM_MIN = 3, 1  # the suffix lengths looked up, longest first
MAX_DRAFT = 16  # tokens a draft may hold (a fixed k) ...
AUTO_MAX_DRAFT = 8  # ... and at most when adapting: on 2 threads a 9-token pass costs ~3 one-token passes
AUTO_FIRST_DRAFT = 4
MAX_BACKOFF = 32  # steps without drafting after repeated misses, at most

Mode = Literal["auto", "off"] | int


class PromptLookup:
    """The tokens of a sequence (prompt, then output) and the n-gram search over them."""

    def __init__(self, ids: list[int]):
        self._tokens = np.zeros(max(2 * len(ids), 256), dtype=np.int64)
        self._n = 0
        self.extend(ids)

    def extend(self, tokens: list[int]) -> None:
        if self._n + len(tokens) > len(self._tokens):
            grown = np.zeros(2 * (self._n + len(tokens)), dtype=np.int64)
            grown[: self._n] = self._tokens[: self._n]
            self._tokens = grown
        self._tokens[self._n: self._n + len(tokens)] = tokens
        self._n += len(tokens)

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix (NGRAM_MAX
        tokens down to NGRAM_MIN) found; empty when none occurs."""
        t, n = self._tokens, self._n
        for g in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if n <= g:
                continue
            suffix = t[n - g: n]
            starts = np.flatnonzero(t[: n - g] == suffix[0])  # an occurrence ends before the suffix starts
            for j in range(1, g):
                starts = starts[t[starts + j] == suffix[j]]
            if len(starts):
                begin = int(starts[-1]) + g
                return t[begin: min(begin + k, n)].tolist()
        return []


@dataclass
class Speculation:
    """One sequence's drafting policy: `mode` is "auto" (adapt the draft length, and draft only where it pays:
    a sequence decoding alone), "off", or a fixed draft length."""

    mode: Mode = "auto"
    k: int = AUTO_FIRST_DRAFT
    misses: int = 0  # drafts in a row of which nothing was accepted
    rest: int = 0  # steps left without drafting
    drafted: int = field(default=0, repr=False)
    accepted: int = field(default=0, repr=False)

    def length(self, alone: bool) -> int:
        """How many tokens to draft for the next pass (0: none)."""
        if self.mode == "off" or (self.mode == "auto" and not alone):
            return 0
        if isinstance(self.mode, int):
            return self.mode
        if self.rest:
            self.rest -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """After a pass that checked `drafted` tokens, of which the first `accepted` were the model's own."""
        self.drafted += drafted
        self.accepted += accepted
        if self.mode != "auto" or not drafted:
            return
        if accepted == drafted:
            self.k = min(2 * self.k, AUTO_MAX_DRAFT)
        else:
            self.k = max(1, accepted + 1)
        self.misses = self.misses + 1 if accepted == 0 else 0
        self.rest = min(2 ** self.misses - 1, MAX_BACKOFF) if self.misses else 0
