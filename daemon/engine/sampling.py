"""Pick the next token from logits in numpy: greedy, or temperature with top-k, top-p and repetition penalty."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgellm.daemon.engine.params import GenerationParams

REPETITION_WINDOW = 64  # llama.cpp's repeat_last_n


class Sampler:
    def __init__(self, params: GenerationParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, recent: Sequence[int]) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and recent:
            seen = np.unique(np.asarray(recent[-REPETITION_WINDOW:]))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        candidates = np.flatnonzero(np.isfinite(logits))
        if p.top_k and p.top_k < len(candidates):
            candidates = candidates[np.argpartition(-logits[candidates], p.top_k - 1)[: p.top_k]]
        shifted = logits[candidates].astype(np.float64)
        order = np.argsort(-shifted)
        candidates, shifted = candidates[order], shifted[order] - shifted[order[0]]
        with np.errstate(over="ignore"):  # shift first: a tiny temperature then gives 0/T and -inf, never NaN
            probs = np.exp(shifted / p.temperature)
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])
