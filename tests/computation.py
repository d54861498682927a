"""Comparing two runs of a prompt by what they computed: the tokens each pass fed and the logits it gave.

Two runs that should compute the same (batched and alone, with and without a speculative draft) take other
onnxruntime kernels, so their logits agree up to rounding (docs/measured-facts.md, "The decoder graph"), and a
near-tie may then pick another token. `same_computation` checks the distributions up to that point.
"""

from __future__ import annotations

import numpy as np


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max(), dtype=np.float64)
    q = np.exp(q_logits - q_logits.max(), dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p + 1e-300) - np.log(q + 1e-300))))


def same_computation(solo, batched, max_kl: float = 0.05) -> bool:
    """Assert the batched run computed what the solo run did: the same tokens fed, next-token distributions
    equal up to kernel rounding, until a pass where a near-tie made the two pick differently. Returns False if
    that happened (the texts may then differ), True if every pass matched."""
    solo_ids, solo_logits = _per_position(solo)
    got_ids, got_logits = _per_position(batched)
    for position in sorted(set(solo_logits) & set(got_logits)):
        if solo_ids[: position + 1] != got_ids[: position + 1]:
            return False  # the previous position chose differently from distributions that agreed
        divergence = kl(solo_logits[position], got_logits[position])
        assert divergence < max_kl, f"position {position}: KL {divergence:.3f}: not rounding"
    # the pick of the last common pass is not fed back when it ends a run (the last token, or an end-of-sequence
    # one run chose and the other did not), so the loop above cannot see a near-tie there: look at it
    last = max(set(solo_logits) & set(got_logits))
    if int(solo_logits[last].argmax()) != int(got_logits[last].argmax()):
        return False
    # a JSON constraint may have masked the argmax there: the pick was then among allowed tokens whose order
    # these logits cannot show (a batched run closed a string where the solo one went on), so no verdict
    picks = [(ids[last + 1], logits[last]) for ids, logits in ((solo_ids, solo_logits), (got_ids, got_logits))
             if len(ids) > last + 1]
    if any(token != int(logits.argmax()) for token, logits in picks):
        return False
    n = min(len(solo_ids), len(got_ids))  # where one run went on (its last fed pass), the answers decide
    assert solo_ids[:n] == got_ids[:n]
    return True


def _per_position(passes) -> tuple[list[int], dict[int, np.ndarray]]:
    """The tokens the sequence holds, and logits by the position of the token fed before them (prompt chunks
    are cut differently batched and alone; a rejected draft's positions are fed again by the next pass)."""
    tokens: list[int] = []
    out: dict[int, np.ndarray] = {}
    for ids, logits, discard in passes:
        tokens.extend(ids)
        for k, row in enumerate(logits):
            out[len(tokens) - len(logits) + k] = row
        del tokens[len(tokens) - discard:]
        for position in [p for p in out if p >= len(tokens)]:
            del out[position]
    return tokens, out


