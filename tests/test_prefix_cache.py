"""Prefix reuse: a prompt that shares a long prefix with an earlier one skips recomputing it, with the same output."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.prefix_cache import PrefixCache
from tests.harness import ROOT

GREEDY = GenerationParams(temperature=0, max_tokens=24)


@pytest.mark.slow
def test_a_shared_500_token_prefix_is_reused_with_identical_output(smollm2_int4):
    context = (ROOT / "models/data/eval_en.txt").read_text()
    model = LoadedModel.load(smollm2_int4, threads=2)
    cold_gen = Generator(model)
    warm_gen = Generator(model, PrefixCache(max_bytes=256 << 20))
    system = ChatMessage(role="system", content=f"Answer from this text.\n\n{context}")
    for question in ("How long must records be kept?", "What does a good invoice show?"):
        ids = cold_gen.prompt_ids(messages=[system, ChatMessage(role="user", content=question)])
        assert len(ids) > 500
        cold = cold_gen.generate(ids, GREEDY)
        warm_gen.generate(ids[:-8] + [ids[-1]], GREEDY)  # an earlier request sharing all but the question's end
        warm = warm_gen.generate(ids, GREEDY)
        assert warm.text == cold.text  # the cached keys and values are the ones the model would compute
        assert warm.usage.cached_tokens >= len(ids) - 9 and cold.usage.cached_tokens == 0
        assert warm.timings.ttft_ms < 0.5 * cold.timings.ttft_ms, (warm.timings.ttft_ms, cold.timings.ttft_ms)


def test_the_cache_stays_within_its_byte_bound():
    arrays = [np.zeros((1, 3, 100, 64), dtype=np.float32) for _ in range(4)]  # 307 kB per 100-token prompt
    cache = PrefixCache(max_bytes=1_000_000, min_tokens=8)
    for i in range(5):
        cache.store([i] * 100, arrays)
    assert cache.bytes <= 1_000_000 and len(cache) == 3
    assert cache.lookup([0] * 100) is None  # the oldest went first
    n, got = cache.lookup([4] * 60 + [9])
    assert n == 60 and got[0].shape == (1, 3, 60, 64) and got[0].flags["C_CONTIGUOUS"]
    assert cache.lookup([4] * 5 + [9]) is None  # shorter than min_tokens: not worth it


def test_concurrent_readers_and_writers_share_the_cache_safely():
    """`model.batch_size` request threads share one cache. Without its lock, a lookup iterating the entries
    while another thread stores raised 'OrderedDict mutated during iteration'."""
    import sys
    import threading

    arrays = [np.zeros((1, 1, 40, 8), dtype=np.float32)]
    cache = PrefixCache(max_bytes=40 * arrays[0].nbytes, min_tokens=8)
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible

    def worker(seed: int) -> None:
        try:
            for i in range(400):
                cache.store([seed, i] + [7] * 38, arrays)
                cache.lookup([seed, i] + [7] * 39)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert cache.bytes == sum(a.nbytes for a in arrays) * len(cache) <= cache.max_bytes
