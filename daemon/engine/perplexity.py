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


def perplexity(model: LoadedModel, text: str) -> tuple[float, int]:
    """Return (perplexity, number of tokens) over `text`, in one forward pass."""
    ids = model.encode(text)
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens of text")
    ids = ids[: model.context_length]
    logits = model.decoder.forward(ids, model.decoder.new_cache(), all_logits=True)
    nll = token_nll(logits[:-1], np.asarray(ids[1:]))
    return float(np.exp(nll.mean())), len(ids)
