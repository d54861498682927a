"""Continuous batching with one owner: a scheduler thread owns the KV pool and runs every forward pass.

The protocol, as in llama.cpp's server and vLLM's engine core:

    request thread                             scheduler thread (the only one touching rows, caches, session)
    seq = Sequence(...); submit(seq)  ──────▶  loop:
    for event in seq.follow(): ...               admit   new sequences into free pool rows (or a private cache)
                                                 check   each sequence's interrupt (cancel, deadline)
                                                 step    one batched pass: every row with one token to feed
                                                 chunk   one pass over a prompt chunk or grammar-forced tokens
                                                 update  sequences sample and post Delta / Result events

A prompt runs in chunks between decode steps, each taking about CHUNK_STEPS decode steps' time, so a long
prompt delays the streams already decoding by that much per token instead of by its whole prefill. On a CPU
a prompt token costs about what a decode row does, so chunks are short (tens of tokens): the price is the long
prompt's own time to first token while others decode. A sequence
joins the batch in the step after its prompt's last chunk. Rows a step does not advance are fed a placeholder
at their next position, which their own next token overwrites; when a row in the middle frees up, the rows
above it move down so steps span only the rows in use. Sequences whose prompt and answer cannot fit a row,
and solo ones (the update health check: computed as alone), run in a cache of their own, one pass at a time,
between the steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from edgellm.daemon.engine.adapters import Adapter
from edgellm.daemon.engine.decoder import KVCache, OnnxDecoder, copy_keys
from edgellm.daemon.engine.drafting import MAX_DRAFT
from edgellm.daemon.engine.sequence import Sequence, State
from edgellm.daemon.errors import EdgeError

log = logging.getLogger("edgellm.scheduler")
IDLE_EXIT_SECONDS = 5.0  # the thread ends when idle this long, and starts again on the next submit
MIN_CHUNK, MAX_CHUNK = 4, 512  # prompt tokens per pass while other sequences decode
CHUNK_STEPS = 1.5  # a chunk's target time, in decode steps: how long the decoding streams wait for it
POOL_PAGE = 128  # positions a row of the KV pool holds at first, and the pool grows by at least


class Scheduler:
    def __init__(self, decoder: OnnxDecoder, rows: int, capacity: int,
                 on_prompt: Callable[[Sequence, KVCache], None] = lambda seq, cache: None,
                 lookup: Callable[[list[int], Adapter | None], tuple[int, list[np.ndarray]] | None]
                 = lambda ids, adapter: None):
        """`on_prompt(seq, cache)` runs when a cache holds exactly a prompt's keys; `lookup(ids, adapter)` finds
        the longest cached prefix of a prompt made with that adapter. (Both are the prefix cache's.) A prompt
        looks its prefix up only when its first pass is due, so requests that arrive together with a shared
        system prompt compute it once: the first stores it, the others find it."""
        if not decoder.in_place:
            raise ValueError("batching needs a graph with an in-place KV cache (edgellm's fused graph)")
        self.decoder = decoder
        self.capacity = capacity
        self.on_prompt, self.lookup = on_prompt, lookup
        self._rows: list[Sequence | None] = [None] * rows
        self._caches: dict[int, KVCache] = {}  # id(sequence) -> its cache (a pool row or private)
        self._pool: list[np.ndarray] = []  # per layer's keys and values: [rows, kv_heads, room, head_dim]
        self._room = 0  # positions each row holds now: grows with the longest row, up to `capacity`
        self._batches: list = []  # IO bindings of the pool's first 1, 2, ... rows
        self._grow_pool(min(POOL_PAGE, capacity))
        self._active: list[Sequence] = []  # admitted, oldest first
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _thread, the only state request threads touch
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.0  # moving average of a decode step, to size prompt chunks
        self._chunk = 16  # prompt tokens per chunk, adjusted after each chunk to take CHUNK_STEPS steps
        self.steps: deque[int] = deque(maxlen=10_000)  # rows each recent batched step spanned (tests, benchmarks)

    # -- request threads ------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            self._inbox.put(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="edgellm-scheduler", daemon=True)
                self._thread.start()

    @property
    def free_rows(self) -> int:
        return sum(r is None for r in self._rows)

    def census(self) -> dict[str, int]:
        """Sequences by state, for status replies: a snapshot another thread takes without a lock (the list is
        copied, each state read once), so it may be a step old, never torn."""
        counts = {"queued": self._inbox.qsize()}
        for seq in list(self._active):
            counts[seq.state.value] = counts.get(seq.state.value, 0) + 1
        return counts

    # -- the scheduler thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self._active:
                try:
                    self._admit(self._inbox.get(timeout=IDLE_EXIT_SECONDS))
                except queue.Empty:
                    with self._lock:
                        if self._inbox.empty():
                            self._thread = None
                            return
                    continue
            while True:  # everything that arrived meanwhile
                try:
                    self._admit(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._iterate()
            except Exception as e:  # a failing pass fails its sequences; the loop and the others go on
                log.exception("a scheduler step failed")
                for seq in list(self._active):
                    self._end(seq, EdgeError("internal", f"{type(e).__name__}: {e}"))

    def _admit(self, seq: Sequence) -> None:
        prefix = seq.cached_keys
        fits = not seq.solo and len(seq.ids) + 1 < self.capacity
        row = next((r for r, s in enumerate(self._rows) if s is None), None) if fits else None
        if row is None:
            cache = self.decoder.new_cache(len(seq.ids) + seq.budget, prefix)
        else:
            self._make_room(seq.usage.cached_tokens + 1)
            cache = KVCache([], 0)
            self._place(cache, row)
            copy_keys(cache.arrays, prefix or [], seq.usage.cached_tokens)
            cache.length = seq.usage.cached_tokens
            self._rows[row] = seq
        seq.cached_keys = None
        self._caches[id(seq)] = cache
        self._active.append(seq)

    def _iterate(self) -> None:
        for seq in list(self._active):
            try:
                seq.check()
            except EdgeError as e:
                self._end(seq, e)
        for seq in list(self._active):  # rows about to overflow move to a cache of their own
            cache = self._caches[id(seq)]
            if cache.row is not None and cache.length + len(seq.next_feed()) >= self.capacity:
                self._detach(seq, cache)
        self._compact()
        stepping = [s for s in self._active if s.state is State.DECODING and len(s.todo) == 1]
        for seq in stepping:  # a draft is checked in a pass of its own (GroupQueryAttention: one row)
            self._propose(seq, alone=len(stepping) == 1)
        batched = [s for s in stepping if self._caches[id(s)].row is not None and not s.draft]
        if batched:
            self._step(batched)
        for seq in [s for s in stepping if s not in batched]:
            self._run(seq, seq.next_feed())  # outgrew its row, or checks a draft: alone, between the steps
        # Grammar-forced tokens (short) go before prompt chunks; among prompts, the least left to feed first, so a
        # short request that arrives during a long prefill starts after one chunk of it, not after all of it.
        waiting = sorted((s for s in self._active if s.state.in_prompt or (s.state is State.DECODING
                                                                           and len(s.todo) > 1)),
                         key=lambda s: (s.state.in_prompt, len(s.todo) if s.state.in_prompt else 0))
        if waiting:
            seq = waiting[0]
            if seq.state is State.QUEUED and not seq.solo:
                self._reuse_prefix(seq)
            self._propose(seq, alone=not stepping)  # forced tokens, and a guess of what follows them
            whole = seq.solo or not seq.state.in_prompt  # forced tokens, or a solo prompt (fed as alone)
            chunked = not whole and any(s.state is State.DECODING for s in self._active if s is not seq)
            started = time.perf_counter()
            # alone, a prompt still runs in passes of at most MAX_CHUNK: whoever arrives meanwhile waits one pass
            feed = seq.next_feed(None if whole else self._chunk if chunked else MAX_CHUNK)
            self._run(seq, feed)
            if chunked:
                self._tune_chunk(len(feed), time.perf_counter() - started)
        for seq in [s for s in self._active if s.finished]:
            self._end(seq)

    def _propose(self, seq: Sequence, alone: bool) -> None:
        """Let a decoding sequence draft what its pass checks, within its row's room."""
        cache = self._caches[id(seq)]
        room = self.capacity - cache.length - len(seq.todo) - 1 if cache.row is not None else MAX_DRAFT
        seq.propose(room, alone)

    def _reuse_prefix(self, seq: Sequence) -> None:
        hit = self.lookup(seq.ids, seq.adapter)
        if hit is not None and hit[0] > seq.usage.cached_tokens:
            cache = self._caches[id(seq)]
            if cache.row is not None:
                self._make_room(hit[0] + 1)  # may point the cache at a longer pool
            copy_keys(cache.arrays, hit[1], hit[0])
            cache.length = hit[0]
            seq.use_cached(hit[0])

    def _tune_chunk(self, tokens: int, seconds: float) -> None:
        """After a chunk pass: scale the next chunk so it takes CHUNK_STEPS decode steps."""
        if self._step_seconds:
            wanted = tokens * CHUNK_STEPS * self._step_seconds / seconds
            self._chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, 0.5 * self._chunk + 0.5 * wanted)))

    def _step(self, batch: list[Sequence]) -> None:
        span = max(self._caches[id(s)].row for s in batch) + 1
        self._make_room(max(self._caches[id(s)].length for s in self._rows[:span] if s is not None) + 1)
        tokens = np.zeros(span, dtype=np.int64)
        past = np.zeros(span, dtype=np.int64)
        for r, seq in enumerate(self._rows[:span]):
            if seq is not None:
                past[r] = self._caches[id(seq)].length
                if seq in batch:
                    tokens[r] = seq.todo[0]
        started = time.perf_counter()
        try:
            adapters = [seq.adapter if seq is not None else None for seq in self._rows[:span]]
            logits = self.decoder.decode_rows(self._batches[span - 1], tokens, past, adapters)
        except Exception as e:  # every sequence in the step sees the failure, none hangs
            log.exception("a batched step failed")
            for seq in batch:
                seq.fail(EdgeError("internal", f"{type(e).__name__}: {e}"))
            return
        self._step_seconds = _average(self._step_seconds, time.perf_counter() - started)
        self.steps.append(span)
        for seq in batch:
            cache = self._caches[id(seq)]
            cache.length += 1
            self._fed(seq, cache, 1, logits[cache.row][None])

    def _run(self, seq: Sequence, feed: list[int]) -> None:
        """One pass of `feed` for one sequence: a prompt chunk, forced tokens, or a step of a private cache."""
        cache = self._caches[id(seq)]
        if cache.row is not None:
            self._make_room(cache.length + len(feed))
        try:
            logits = self.decoder.forward(feed, cache, adapter=seq.adapter, last=seq.logit_rows)
        except Exception as e:
            log.exception("a forward pass failed")
            seq.fail(EdgeError("internal", f"{type(e).__name__}: {e}"))
            return
        self._fed(seq, cache, len(feed), logits)
        cache.rewind(seq.discard)

    def _fed(self, seq: Sequence, cache: KVCache, n: int, logits: np.ndarray) -> None:
        """Hand a pass's logits to its sequence; a failure there (sampling, grammar) ends that sequence only."""
        try:
            if seq.fed(n, logits):
                self.on_prompt(seq, cache)
        except EdgeError as e:
            seq.fail(e)
        except Exception as e:
            log.exception("a sequence failed after its pass")
            seq.fail(EdgeError("internal", f"{type(e).__name__}: {e}"))

    def _detach(self, seq: Sequence, cache: KVCache) -> None:
        """Move a sequence outgrowing its row into a cache of its own (copied), freeing the row."""
        private = self.decoder.new_cache(len(seq.ids) + seq.budget + 1,
                                         [a[:, :, : cache.length] for a in cache.arrays])
        self._rows[cache.row] = None
        cache.arrays, cache.binding, cache.row = private.arrays, private.binding, None

    def _compact(self) -> None:
        """Move sequences from high rows into free lower ones, so steps span only the rows in use."""
        for high in range(len(self._rows) - 1, -1, -1):
            seq = self._rows[high]
            low = next((r for r in range(high) if self._rows[r] is None), None)
            if seq is None or low is None:
                continue
            cache = self._caches[id(seq)]
            old = cache.arrays
            self._place(cache, low)
            copy_keys(cache.arrays, old, cache.length)
            self._rows[low], self._rows[high] = seq, None

    def _place(self, cache: KVCache, row: int) -> None:
        """Point `cache` at pool row `row` (views of the pool, and a binding reading and writing them)."""
        arrays = [b[row:row + 1] for b in self._pool]
        cache.arrays, cache.binding, cache.row = arrays, self.decoder.bind(arrays), row

    def _make_room(self, positions: int) -> None:
        """Before a pass that writes pool rows up to `positions`: grow the pool if its rows are shorter."""
        if positions > self._room:
            pages = -(-positions // POOL_PAGE) * POOL_PAGE
            self._grow_pool(min(self.capacity, max(2 * self._room, pages)))

    def _grow_pool(self, room: int) -> None:
        """A pool whose rows hold `room` positions, what the old one held copied in, every binding made again.

        The pool costs rows x its longest row, not rows x `capacity` from the start: 4 rows of SmolLM2 hold
        23 MB at 128 positions, 90 MB at 512. Committed when made (filled): onnxruntime writes a row's whole
        extent on a prompt, and faulting fresh pages in then cost ~1 s per row on this machine."""
        d, rows = self.decoder, len(self._rows)
        pool = [np.full((rows, d.kv_heads, room, d.head_dim), 0.0, dtype=d.kv_dtype) for _ in d.past_names]
        for new, old in zip(pool, self._pool, strict=False):
            new[:, :, : self._room] = old
        self._pool, self._room = pool, room
        self._batches = [d.bind([b[:n] for b in pool]) for n in range(1, rows + 1)]
        for seq in self._rows:
            if seq is not None:
                cache = self._caches[id(seq)]
                self._place(cache, cache.row)

    @property
    def pool_bytes(self) -> int:
        return sum(b.nbytes for b in self._pool)

    def _end(self, seq: Sequence, error: EdgeError | None = None) -> None:
        if error is not None and not seq.finished:
            seq.fail(error)
        cache = self._caches.pop(id(seq))
        if cache.row is not None:
            self._rows[cache.row] = None
        self._active.remove(seq)


def _average(old: float, new: float) -> float:
    return new if not old else 0.8 * old + 0.2 * new
