"""Drafts for speculative decoding, taken from the text a sequence already holds (prompt lookup).

What edgellm is mostly asked for copies its input: a field out of a document, a sentence of a retrieved
passage, an argument out of the request. Where the output's last few tokens also occur earlier in the prompt
or the output, the tokens that followed them there are a good guess of what comes next. One forward pass
over the guess checks all of it (Sequence.fed keeps the longest prefix the model itself samples), and a pass
over a few tokens costs little more than a pass over one: on 2 threads a SmolLM2 pass of 4 tokens takes
about 1.8x one of 1 (docs/measured-facts.md, "Speculative decoding"). Nothing is trained or loaded: a draft
is a search over token ids.

How far to guess follows what was accepted (`Speculation`): the length that makes the most tokens per
second at the acceptance seen so far and the cost of a wider pass, none where no length pays, with a rare
one-token probe then, so free text with nothing to copy pays for a draft only now and then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

NGRAM_MAX, NGRAM_MIN = 3, 1  # the suffix lengths looked up, longest first
MAX_DRAFT = 16  # tokens a draft may hold (a fixed k) ...
AUTO_MAX_DRAFT = 8  # ... and at most when adapting: on 2 threads a 9-token pass costs ~3 one-token passes
MAX_BACKOFF = 32  # steps without a probe after repeated misses, at most
DECAY = 0.7  # weight of the acceptance seen before the last check
# What each token a pass feeds beyond the first costs, in passes of one: measured on 2 threads 0.27 (SmolLM2
# int4, 4 and 8 tokens) and 0.22-0.31 (Gemma 3 270M), docs/measured-facts.md. A constant, not a measurement
# made while serving: then the drafts, and so the kernels a pass takes, depend on the sequence alone, and a
# greedy answer does not change with the machine's load.
COST_PER_TOKEN = 0.3

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


def pass_cost(width: int) -> float:
    """A pass over `width` tokens, in passes over one."""
    return 1 + COST_PER_TOKEN * (width - 1)


def best_length(alpha: float, longest: int) -> int:
    """The draft length that makes the most tokens per unit of time, if each guess is kept with probability
    `alpha` once the ones before it were: k guesses give 1 + alpha + ... + alpha^k tokens for a pass of k + 1.
    0 when no draft beats a plain pass."""
    best, best_rate, expected, p = 0, 1.0, 1.0, 1.0
    for k in range(1, longest + 1):
        p *= alpha
        expected += p
        rate = expected / pass_cost(k + 1)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


@dataclass
class Speculation:
    """One sequence's drafting policy: `mode` is "auto" (draft as far as pays at the acceptance seen so far,
    and only where drafting pays at all: a sequence decoding alone), "off", or a fixed draft length.

    The acceptance estimate counts kept guesses and first rejections with a decay (recent checks weigh most),
    from a prior of one each. Where no length pays, a one-token probe is still drafted now and then (after 1,
    3, 7 ... steps, at most MAX_BACKOFF), so a sequence that starts copying is noticed."""

    mode: Mode = "auto"
    kept: float = 0.0  # decayed counts of guesses kept and of checks that rejected one
    rejected: float = 0.0
    misses: int = 0  # probes in a row of which nothing was kept
    rest: int = 0  # steps left before the next probe

    @property
    def alpha(self) -> float:
        return (self.kept + 1) / (self.kept + self.rejected + 2)

    def length(self, alone: bool) -> int:
        """How many tokens to draft for the next pass (0: none)."""
        if self.mode == "off" or (self.mode == "auto" and not alone):
            return 0
        if isinstance(self.mode, int):
            return self.mode
        k = best_length(self.alpha, AUTO_MAX_DRAFT)
        if k:
            return k
        if self.rest:
            self.rest -= 1
            return 0
        return 1

    def update(self, drafted: int, accepted: int) -> None:
        """After a pass that checked `drafted` tokens, of which the first `accepted` were the model's own."""
        if self.mode != "auto" or not drafted:
            return
        self.kept = DECAY * self.kept + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)
        self.misses = self.misses + 1 if accepted == 0 else 0
        self.rest = min(2 ** self.misses - 1, MAX_BACKOFF)
