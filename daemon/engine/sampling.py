"""Pick the next token from logits in numpy: greedy, or temperature with top-k, top-p, min-p and the repetition,
frequency and presence penalties; and the log-probabilities a request may ask to see."""

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
        if p.penalizes and recent:  # llama.cpp's penalties sampler: the same window and order
            seen, counts = np.unique(np.asarray(recent[-REPETITION_WINDOW:]), return_counts=True)
            values = logits[seen]
            if p.repetition_penalty != 1.0:
                values = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            logits[seen] = values - counts * p.frequency_penalty - p.presence_penalty
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        candidates = np.flatnonzero(np.isfinite(logits))
        if p.top_k and p.top_k < len(candidates):
            candidates = candidates[np.argpartition(-logits[candidates], p.top_k - 1)[: p.top_k]]
        shifted = logits[candidates].astype(np.float64)
        order = np.argsort(-shifted)
        candidates, shifted = candidates[order], shifted[order] - shifted[order[0]]
        if p.min_p > 0.0:  # on the model's probabilities, before temperature, as llama.cpp's chain has it
            keep = int(np.count_nonzero(shifted >= np.log(p.min_p)))
            candidates, shifted = candidates[:keep], shifted[:keep]
        with np.errstate(over="ignore"):  # shift first: a tiny temperature then gives 0/T and -inf, never NaN
            probs = np.exp(shifted / p.temperature)
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    """log softmax in float64: the model's distribution (grammar masks and repetition penalty applied, before
    temperature and truncation), which is what OpenAI's and llama-server's logprobs report."""
    shifted = logits.astype(np.float64) - np.max(logits)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted)))
