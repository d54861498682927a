"""An exported decoder on onnxruntime: one forward pass over new tokens, extending a KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far, in session input order."""

    arrays: list[np.ndarray]
    length: int = 0


class OnnxDecoder:
    """Wraps one InferenceSession; knows the input names optimum's text-generation-with-past export uses."""

    def __init__(self, model_path: Path, threads: int = 0):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        self.present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        self.has_logit_positions = "logit_positions" in inputs
        first = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(first[1]), int(first[3])
        self.vocab_size = self.session.get_outputs()[0].shape[-1]

    def new_cache(self) -> KVCache:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return KVCache(arrays=[empty] * len(self.past_names))

    def forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run the new tokens, extend `cache` in place, return logits [n, vocab] (or [1, vocab] for the last)."""
        n = len(ids)
        total = cache.length + n
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
        }
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(cache.length, total, dtype=np.int64)[None, :]
        if self.has_logit_positions:
            positions = np.arange(n) if all_logits else np.asarray([n - 1])
            feeds["logit_positions"] = positions.astype(np.int64)
        feeds.update(zip(self.past_names, cache.arrays, strict=True))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        cache.arrays = outputs[1:]
        cache.length = total
        logits = outputs[0][0]
        return logits if all_logits else logits[-1:]
