"""Perplexity of a loaded model on a text: the quality figure the manifest records and smoke tests check."""

from __future__ import annotations

import numpy as np

from edgellm.daemon.engine.model import LoadedModel


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under float64 log-softmax of its logits row."""
    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return log_norm - logits[np.arange(len(targets)), targets]


CHUNK = 64  # tokens per pass: the logits of a pass are [chunk, vocab] float32, 12.5 MB at a 49k vocabulary


def perplexity(model: LoadedModel, text: str) -> tuple[float, int]:
    """Return (perplexity, number of tokens) over `text`: passes of CHUNK tokens over one KV cache (the same
    figure as one pass over the whole text, in a fraction of its memory: a 1B build's one pass took 1 GB)."""
    ids = model.encode(text)
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens of text")
    ids = ids[: model.context_length]
    cache = model.decoder.new_cache(capacity=len(ids))
    nll = []
    for start in range(0, len(ids) - 1, CHUNK):
        chunk = ids[start:start + CHUNK]
        targets = np.asarray(ids[start + 1:start + 1 + len(chunk)])
        logits = model.decoder.forward(chunk, cache, all_logits=True)
        nll.append(token_nll(logits[:len(targets)], targets))
    return float(np.exp(np.concatenate(nll).mean())), len(ids)
