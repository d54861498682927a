"""Continuous batching: the decode steps of concurrent requests run as one batched forward pass.

Each request keeps its own thread, sampler, grammar, stop strings and deadline (daemon/engine/generate.py); only
the forward pass is shared. Sequences live in the rows of one KV pool: a request takes a row when it starts
and frees it when it ends, so requests join and leave the batch at token boundaries. A prompt (prefill) runs
alone. On 2 cores, four SmolLM2 streams decode at 2.2-2.5x the tokens per second of one (README,
"Benchmark").

Rows a step does not advance (free, or their request is busy elsewhere) are fed a placeholder token at
their next position: GroupQueryAttention writes its keys there, and the row's own next token overwrites
them. Only graphs with an in-place cache (models/fused_graph.py) batch; others run one request at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from edgellm.daemon.engine.decoder import KVCache, OnnxDecoder, copy_keys


class BatchingDecoder:
    def __init__(self, decoder: OnnxDecoder, rows: int, capacity: int, gather_seconds: float = 0.004):
        self.decoder = decoder
        self.vocab_size = decoder.vocab_size
        self.capacity = capacity
        self.gather_seconds = gather_seconds  # how long a step waits for the other rows' next tokens
        shape = (rows, decoder.kv_heads, capacity, decoder.head_dim)
        # Committed now: onnxruntime writes a row's whole extent on a prompt, and faulting in fresh pages then
        # cost ~1 s per row on this machine.
        self._pool = [np.full(shape, 0.0, dtype=np.float32) for _ in decoder.past_names]
        self._batches = [decoder.bind([b[:n] for b in self._pool]) for n in range(1, rows + 1)]
        self._free = list(range(rows))
        self._live: dict[int, KVCache] = {}
        self._pending: dict[int, int] = {}  # row -> token to decode
        self._results: dict[int, np.ndarray | BaseException] = {}
        self._leading = False
        self._cond = threading.Condition()
        self._session = threading.Lock()  # one forward pass at a time: two would only share the same cores

    def new_cache(self, capacity: int = 0, prefix: list[np.ndarray] | None = None) -> KVCache:
        """A pool row, or a private cache (run unbatched) when the pool is full or too short."""
        length = prefix[0].shape[2] if prefix else 0
        with self._cond:  # a row if the prompt fits; a request outgrowing it moves out (_detach)
            row = self._free.pop(0) if self._free and length + 1 < self.capacity else None
        if row is None:
            return self.decoder.new_cache(capacity, prefix)
        arrays = [b[row:row + 1] for b in self._pool]
        cache = KVCache(arrays, length, self.decoder.bind(arrays), row=row)
        with self._session:  # a step in flight may be writing a placeholder into this (free) row
            copy_keys(arrays, prefix or [], length)
            with self._cond:  # the next step places this row's placeholder after the copied prefix
                self._live[row] = cache
        return cache

    def release(self, cache: KVCache) -> None:
        if cache.row is None:
            return
        with self._cond:
            self._live.pop(cache.row, None)
            self._free.append(cache.row)
            self._free.sort()  # low rows first keeps the batch short
            cache.row = None
            self._cond.notify_all()

    def forward(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        if cache.row is not None and cache.length + len(ids) > self.capacity:
            self._detach(cache)
        if cache.row is None or len(ids) != 1 or all_logits:
            with self._session:
                return self.decoder.forward(ids, cache, all_logits)
        return self._decode_together(cache, ids[0])[None, :]

    def _detach(self, cache: KVCache) -> None:
        """Move a sequence outgrowing its row into a private cache (copied), freeing the row."""
        private = self.decoder.new_cache(cache.length + 1, [a[:, :, : cache.length] for a in cache.arrays])
        self.release(cache)
        cache.arrays, cache.binding = private.arrays, private.binding

    def _decode_together(self, cache: KVCache, token: int) -> np.ndarray:
        key = id(cache)  # results follow the cache: compaction may move it to another row while it waits
        with self._cond:
            self._pending[cache.row] = token
            self._cond.notify_all()
            while key not in self._results:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                deadline = time.monotonic() + self.gather_seconds
                while len(self._pending) < len(self._live) and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                self._compact()
                batch, self._pending = self._pending, {}
                self._cond.release()
                try:
                    results = self._step(batch)
                except BaseException as e:  # every request in the step sees the failure, none hangs
                    results = dict.fromkeys(batch, e)
                finally:
                    self._cond.acquire()
                    self._leading = False
                for r, result in results.items():
                    if not isinstance(result, BaseException):
                        self._live[r].length += 1
                    self._results[id(self._live[r])] = result
                self._cond.notify_all()
            result = self._results.pop(key)
        if isinstance(result, BaseException):
            raise result
        return result

    def _compact(self) -> None:
        """Move waiting sequences from high rows into free lower ones, so a step spans fewer rows once a
        request in the middle has left. Only waiting rows move: their threads touch nothing until the step
        answers them, and no other step can run while this leader holds the lead."""
        for row in sorted(self._pending, reverse=True):
            if not self._free or self._free[0] > row:
                break
            target = self._free.pop(0)
            cache = self._live.pop(row)
            arrays = [b[target:target + 1] for b in self._pool]
            copy_keys(arrays, cache.arrays, cache.length)
            cache.arrays, cache.binding, cache.row = arrays, self.decoder.bind(arrays), target
            self._live[target] = cache
            self._pending[target] = self._pending.pop(row)
            self._free.append(row)
            self._free.sort()

    def _step(self, batch: dict[int, int]) -> dict[int, np.ndarray]:
        n = max(batch) + 1
        tokens = np.array([batch.get(r, 0) for r in range(n)], dtype=np.int64)
        with self._session:
            # Lengths are read only now that no prompt can be running: a row whose prompt ran while this step
            # waited for the session gets its placeholder after the prompt's keys, not over them.
            with self._cond:
                past = np.array([self._live[r].length if r in self._live else 0 for r in range(n)], dtype=np.int64)
            logits = self.decoder.decode_rows(self._batches[n - 1], tokens, past)
        return {r: logits[r] for r in batch}
