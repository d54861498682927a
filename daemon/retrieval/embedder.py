"""Sentence embeddings from an ONNX encoder: tokenizers, one session, mean pooling, L2 normalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgellm.daemon.engine.decoder import cpu_session
from edgellm.daemon.engine.manifest import Embedding, ModelManifest, load_manifest
from edgellm.daemon.engine.model import MODEL_FILE, TOKENIZER_FILE
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.library import resolve_model


class Embedder:
    def __init__(self, folder: str | Path, threads: int = 1):
        """`folder` may be a model name from the local library, as for the chat model (daemon/library.py)."""
        self.folder = folder = resolve_model(folder)
        self.manifest: ModelManifest = load_manifest(folder, task="embedding")
        info = self.manifest.embedding
        try:
            self.session = cpu_session(folder / MODEL_FILE, threads)
            self.tokenizer = embedding_tokenizer(folder / TOKENIZER_FILE, info)
        except Exception as e:
            raise EdgeError("model_unavailable", f"{folder}: cannot load the embedding model: {e}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dimension = info.dimension

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def default_batch_size(self) -> int:
        """int8 models quantize activations per batch, so a text's vector would depend on its batch-mates:
        embed them one at a time (measured here, batch 1 runs within ~20% of batch 32)."""
        return 1 if self.manifest.quantization.scheme == "int8" else 32

    def embed(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """[len(texts), dimension] float32; batches are formed from similar lengths to waste little padding."""
        batch_size = batch_size or self.default_batch_size
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self._batch([texts[i] for i in idx])
        return out

    def _batch(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return pool(self.session.run(None, feeds)[0], mask, self.manifest.embedding)


def embedding_tokenizer(path: Path, layout: Embedding) -> Tokenizer:
    """The model's tokenizer, padding and truncating as its manifest says. Shipped tokenizer.json files often
    fix both at 128, and ids then differ from sentence-transformers': reset them first."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=layout.pad_token_id)
    tokenizer.enable_truncation(layout.max_length)
    return tokenizer


def pool(hidden: np.ndarray, mask: np.ndarray, layout: Embedding) -> np.ndarray:
    """Token states [batch, tokens, dim] to sentence vectors: the CLS state or the mean over real tokens,
    L2-normalized where the model says so."""
    if layout.pooling == "cls":
        vectors = hidden[:, 0]
    else:
        weights = mask[:, :, None].astype(np.float32)
        vectors = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if layout.normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype(np.float32)
