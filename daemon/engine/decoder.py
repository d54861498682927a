"""An exported decoder on onnxruntime: one forward pass over new tokens, extending a KV cache.

Two cache layouts, chosen by the graph:
- optimum's export concatenates past and new keys into fresh `present` arrays on every pass;
- edgellm's fused graph (GroupQueryAttention) writes new keys into the very buffer it reads the past from.
  The cache then preallocates those buffers and binds them as both input and output (IO binding), so a
  decode step copies no keys at all: +10-15% decode tok/s on SmolLM2 at a 200-token context.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgellm.daemon.engine.adapters import Adapter, AdapterSlots

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
KV_CACHE_KEY = "edgellm.kv_cache"  # model metadata: how the graph treats its past keys and values
KV_IN_PLACE = "in_place"
MIN_CAPACITY = 256


@dataclass
class KVCache:
    """Keys and values of every layer for the first `length` tokens, in session input order.

    In-place caches hold [1, kv_heads, capacity, head_dim] buffers the session writes into; the others hold
    exactly `length` positions."""

    arrays: list[np.ndarray]
    length: int = 0
    binding: ort.IOBinding | None = field(default=None, repr=False)
    row: int | None = None  # its row in the scheduler's pool (daemon/engine/scheduler.py)

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    def rewind(self, tokens: int) -> None:
        """Forget the last `tokens` positions (a rejected draft's). An in-place buffer keeps them until the next
        pass overwrites them; attention never reads past `length`."""
        if tokens:
            self.length -= tokens
            if self.binding is None:
                self.arrays = [a[:, :, : self.length] for a in self.arrays]

    def prefix(self) -> list[np.ndarray]:
        """The keys and values seen so far, as arrays no later forward pass writes to."""
        if self.binding is None:
            return self.arrays  # the next pass replaces these arrays instead of writing into them
        return [a[:, :, : self.length].copy() for a in self.arrays]


def copy_keys(targets: list[np.ndarray], sources: list[np.ndarray], length: int) -> None:
    """Copy the first `length` positions of every layer's keys/values from `sources` into `targets`."""
    for target, source in zip(targets, sources, strict=False):
        target[:, :, :length] = source[:, :, :length]


def cpu_session(model_path: Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session on the CPU with every graph optimization: `threads` intra-op threads (0: one per
    core), ops run one after another (a decoder's graph has little to run in parallel)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    release_mapped_weights(Path(model_path).parent)
    return session


def release_mapped_weights(folder: Path) -> int:
    """Ask the kernel to drop this process's resident pages of the model's memory-mapped external data.

    onnxruntime maps the weights file and MatMulNBits packs each weight into its own buffer, but it keeps the
    original block scales mapped beside the packed copy (docs/measured-facts.md): at 1B parameters that is
    ~135 MB of pages that are never read again. MADV_PAGEOUT (Linux 5.4) is only advice: a page read again (an
    embedding row, a norm) comes back from the page cache. Returns the number of mappings advised."""
    madvise = _libc_madvise()
    if madvise is None:
        return 0
    folder = str(Path(folder).resolve()) + os.sep
    advised = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n").startswith(folder):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                advised += madvise(start, end - start, _MADV_PAGEOUT) == 0
    return advised


_MADV_PAGEOUT = 21  # linux/mman.h


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


class OnnxDecoder:
    """Wraps one InferenceSession; knows the input names optimum's text-generation-with-past export uses."""

    def __init__(self, model_path: Path, threads: int = 0):
        self.session = cpu_session(model_path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
        self.present_names = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        self.has_position_ids = "position_ids" in inputs
        self.has_logit_positions = "logit_positions" in inputs
        first = inputs[self.past_names[0]]  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        # float16 in fused graphs built with --kv-cache float16 (models/building/fused_graph.py), else float32
        self.kv_dtype = np.dtype(np.float16) if first.type == "tensor(float16)" else np.dtype(np.float32)
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.in_place = metadata.get(KV_CACHE_KEY) == KV_IN_PLACE
        self.adapters = AdapterSlots.from_metadata(metadata)  # None: the graph takes no run-time adapters

    def _adapter_feeds(self, rows: list[Adapter | None]) -> dict[str, np.ndarray]:
        return self.adapters.feeds(rows) if self.adapters is not None else {}

    def new_cache(self, capacity: int = 0, prefix: list[np.ndarray] | None = None) -> KVCache:
        """An empty cache, or one holding `prefix` (arrays from KVCache.prefix). `capacity` is a hint: the
        tokens the caller expects to feed in all; an in-place cache grows if it is exceeded."""
        length = prefix[0].shape[2] if prefix else 0
        if not self.in_place:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            return KVCache(list(prefix) if prefix else [empty] * len(self.past_names), length)
        cache = KVCache([], 0)
        self._grow(cache, max(capacity, length + 1, MIN_CAPACITY))
        copy_keys(cache.arrays, prefix or [], length)
        cache.length = length
        return cache

    def _grow(self, cache: KVCache, capacity: int) -> None:
        """Move the cache to buffers of `capacity` positions, keeping what it holds."""
        arrays = [np.zeros((1, self.kv_heads, capacity, self.head_dim), dtype=self.kv_dtype)
                  for _ in self.past_names]
        copy_keys(arrays, cache.arrays, cache.length)
        cache.arrays, cache.binding = arrays, self.bind(arrays)

    def bind(self, arrays: list[np.ndarray]) -> ort.IOBinding:
        """An IO binding reading past keys/values from `arrays` and writing the new ones into them."""
        binding = self.session.io_binding()
        for past, present, array in zip(self.past_names, self.present_names, arrays, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy memory (C-contiguous views too)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding

    def decode_rows(self, binding: ort.IOBinding, tokens: np.ndarray, past: np.ndarray,
                    adapters: list[Adapter | None] | None = None) -> np.ndarray:
        """One token for each row of a batch bound by `bind`; row r has `past[r]` positions before it
        (right-padded: the attention mask tells GroupQueryAttention each row's length) and runs `adapters[r]`
        (None: the base). Logits [rows, vocab]."""
        total = past + 1
        mask = (np.arange(total.max())[None, :] < total[:, None]).astype(np.int64)
        feeds = {"input_ids": tokens[:, None], "attention_mask": mask, "logit_positions": np.zeros(1, np.int64)}
        feeds.update(self._adapter_feeds(adapters or [None] * len(tokens)))
        return self._run_bound(binding, feeds, (len(tokens), 1))[:, 0]

    def _run_bound(self, binding: ort.IOBinding, feeds: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        """Run with the keys/values `binding` holds; logits [batch, positions, vocab] land in a fresh array."""
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        logits = np.empty((*shape, self.vocab_size), dtype=np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits

    def forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False,
                adapter: Adapter | None = None, last: int = 1) -> np.ndarray:
        """Run the new tokens, extend `cache` in place, return logits [n, vocab] (or [last, vocab] for the last
        `last` positions: a speculative draft's). `adapter`: a LoRA adapter loaded on this model
        (edgellm/daemon/engine/adapters.py), None for the base."""
        n = len(ids)
        total = cache.length + n
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **self._adapter_feeds([adapter]),
        }
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(cache.length, total, dtype=np.int64)[None, :]
        wanted = n
        if self.has_logit_positions:
            positions = np.arange(n) if all_logits else np.arange(n - min(last, n), n)
            feeds["logit_positions"] = positions.astype(np.int64)
            wanted = len(positions)
        if self.in_place:
            if total > cache.capacity:
                self._grow(cache, max(total, 2 * cache.capacity))
            logits = self._run_bound(cache.binding, feeds, (1, wanted))[0]
        else:
            feeds.update(zip(self.past_names, cache.arrays, strict=True))
            outputs = self.session.run(["logits", *self.present_names], feeds)
            cache.arrays = outputs[1:]
            logits = outputs[0][0]
        cache.length = total
        return logits if all_logits else logits[-last:]
