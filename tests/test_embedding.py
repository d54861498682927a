"""The embedding model: all-MiniLM-L6-v2 from its PyPI package, int8 per-channel, on onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.daemon.engine.manifest import load_manifest
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.embedder import Embedder


def test_int8_keeps_cosine_to_the_source(minilm_int8):
    m = load_manifest(minilm_int8, verify_hashes=True)
    assert m.task == "embedding" and m.embedding.dimension == 384 and m.embedding.normalize
    assert m.quantization.per_channel is True
    assert m.quality.cosine_min >= 0.98, m.quality


def test_similar_sentences_are_closer_than_unrelated_ones(minilm_int8):
    e = Embedder(minilm_int8)
    v = e.embed(["The invoice is due in thirty days.", "Payment of the bill is due within 30 days.",
                 "The patient should rest for a week."])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_a_text_gets_the_same_vector_whatever_else_is_embedded_with_it(minilm_int8):
    e = Embedder(minilm_int8)
    texts = ["short", "a much longer sentence about a contract for cleaning services " * 3, "medium length text"]
    together = e.embed(texts)
    alone = np.stack([e.embed([t])[0] for t in texts])
    assert np.abs(together - alone).max() < 1e-6
    # explicit batches trade that for speed: int8 activations are quantized per batch, padding included
    # (measured 2026-11-30: cosine 0.978 for the short text padded to the long one's length, 0.99 for the rest)
    batched = e.embed(texts, batch_size=32)
    assert (batched * alone).sum(axis=1).min() > 0.97


def test_long_inputs_are_truncated_not_refused(minilm_int8):
    v = Embedder(minilm_int8).embed(["word " * 2000])
    assert v.shape == (1, 384) and np.isfinite(v).all()


def test_a_generation_model_is_not_an_embedding_model(smollm2_int4):
    with pytest.raises(EdgeError, match="text-generation model; a embedding model is needed"):
        Embedder(smollm2_int4)
