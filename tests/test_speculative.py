"""Speculative decoding from the prompt: a draft checked in one pass changes what is computed by rounding at
most, never what is sampled.

On fp32 builds of tiny models (every kernel path rounds alike there) greedy output is token for token the
output without drafts, alone and batched, Gemma 3's sliding window included. On the real SmolLM2 int4 build
a pass over several positions takes other MatMulNBits kernels than a pass over one, whose int8 rounding
can move a logit by ~1 (docs/measured-facts.md), so there the two runs must compute the same distributions
up to the first near-tie, as batching must (tests/computation.py). With temperature, the acceptance rule
keeps the sampled distribution: checked over many samples on logits chosen by the test.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.sequence import Sequence, State
from tests.computation import same_computation
from tests.conftest import build

INVOICE = ("Invoice INV-2024-0042 from Acme Tools GmbH, Hauptstrasse 12, 10115 Berlin. Billed to Northwind "
           "Traders Ltd, 4 Harbour Road, Dublin. Total due: 1,284.50 EUR by 15 March 2025.")
COPY = f"Repeat the following text exactly.\n\n{INVOICE}"
TINY_PROMPTS = ["the cat sat on the mat and the cat", "a b c d e f g a b c", "hello world hello"]


@pytest.fixture(scope="module")
def tiny_fp32(tiny_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("speculative")
    return {arch: LoadedModel.load(build(tiny_sources[arch], root / arch, "fp32"), threads=2)
            for arch in ("llama", "gemma3_text")}


@pytest.fixture(scope="module")
def model(smollm2_int4):
    return LoadedModel.load(smollm2_int4, threads=2)


def greedy(**kw) -> GenerationParams:
    return GenerationParams(temperature=0, **kw)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_greedy_output_is_the_same_token_for_token_with_drafts_on_fp32(tiny_fp32, arch):
    m = tiny_fp32[arch]
    alone = Generator(m)
    drafted = accepted = passes = tokens = 0
    for prompt in TINY_PROMPTS:
        ids = m.encode(prompt)
        plain = alone.generate(ids, greedy(max_tokens=60, ignore_eos=True, speculative="off"))
        assert plain.usage.drafted_tokens == 0 and plain.forward_passes == 60
        for mode in ("auto", 3, 16):
            got = alone.generate(ids, greedy(max_tokens=60, ignore_eos=True, speculative=mode))
            assert got.tokens == plain.tokens, (prompt, mode)
            drafted += got.usage.drafted_tokens
            accepted += got.usage.accepted_tokens
            passes += got.forward_passes
            tokens += got.usage.completion_tokens
    # random weights repeat themselves, so drafts are taken, and the accepted ones saved passes
    assert accepted > 0 and drafted > accepted and passes == tokens - accepted


def test_batched_rows_checking_drafts_keep_their_own_answers(tiny_fp32):
    """A fixed draft length drafts even while others decode: each such row runs its check alone, between the
    batched steps, and every answer stays what it is alone without drafts."""
    m = tiny_fp32["gemma3_text"]
    alone = Generator(m)
    expected = [alone.generate(m.encode(p), greedy(max_tokens=40, ignore_eos=True, speculative="off")).tokens
                for p in TINY_PROMPTS]
    batched = Generator(m, batch_rows=4, batch_context=64)  # the answers outgrow their rows, too
    results: list = [None] * len(TINY_PROMPTS)
    start = threading.Barrier(len(TINY_PROMPTS))

    def one(i: int) -> None:
        ids = m.encode(TINY_PROMPTS[i])
        start.wait()
        results[i] = batched.generate(ids, greedy(max_tokens=40, ignore_eos=True, speculative=4 if i else "off"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(TINY_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.tokens for r in results] == expected
    assert results[0].usage.drafted_tokens == 0 and sum(r.usage.accepted_tokens for r in results[1:]) > 0
    assert max(batched.scheduler.steps) >= 2 and batched.scheduler.free_rows == 4


def test_copying_text_takes_fewer_passes_and_computes_what_plain_decoding_does(model, passes):
    g = Generator(model)
    ids = g.prompt_ids(COPY)
    plain = g.generate(ids, greedy(max_tokens=60, speculative="off"))
    off_run = list(passes.values())[-1]
    fast = g.generate(ids, greedy(max_tokens=60))  # auto, alone: drafts
    auto_run = list(passes.values())[-1]
    assert fast.usage.accepted_tokens >= fast.usage.completion_tokens // 2, fast.usage
    assert fast.forward_passes <= 0.6 * plain.forward_passes, (fast.forward_passes, plain.forward_passes)
    if same_computation(off_run, auto_run):  # no near-tie parted them: then the texts are the same
        assert fast.text == plain.text


def test_copied_fields_draft_their_source_and_stay_valid(model, passes):
    schema = {"type": "object", "additionalProperties": False, "required": ["vendor", "total"],
              "properties": {"vendor": {"type": "string", "x-edgellm-copy": True},
                             "total": {"type": "string", "x-edgellm-copy": True}}}
    g = Generator(model, batch_rows=2)  # through the scheduler: one request decodes alone, so auto drafts
    ids = g.prompt_ids(f"Give the vendor and the total as JSON.\n\n{INVOICE}")
    plain = g.generate(ids, greedy(max_tokens=60, json_schema=schema, speculative="off"))
    off_run = list(passes.values())[-1]
    fast = g.generate(ids, greedy(max_tokens=60, json_schema=schema))
    auto_run = list(passes.values())[-1]
    assert fast.json is not None and fast.json["vendor"] in INVOICE and fast.json["total"] in INVOICE
    assert fast.usage.accepted_tokens > 0 and fast.forward_passes < plain.forward_passes
    if same_computation(off_run, auto_run):
        assert fast.json == plain.json


def test_free_text_with_nothing_to_copy_drafts_rarely(model):
    g = Generator(model)
    r = g.generate(g.prompt_ids("Write a short poem about the sea."), greedy(max_tokens=80, ignore_eos=True))
    # misses back off (1, 3, 7 ... steps without drafting), so few passes check a draft nobody takes
    assert r.usage.drafted_tokens - r.usage.accepted_tokens <= 40, r.usage


def test_the_server_setting_is_the_default_and_a_request_overrides_it(model):
    g = Generator(model, speculative="off")
    ids = g.prompt_ids(COPY)
    assert g.generate(ids, greedy(max_tokens=30)).usage.drafted_tokens == 0
    assert g.generate(ids, greedy(max_tokens=30, speculative=4)).usage.accepted_tokens > 0
    solo = Generator(model).generate(ids, greedy(max_tokens=30, speculative=4), solo=True)
    assert solo.usage.drafted_tokens == 0  # the health check computes as alone, without drafts


def test_sampling_with_a_draft_keeps_the_distribution(model):
    """Logits chosen by the test, a draft guessing the second-likeliest token: over many runs the first token
    follows p (a drafted guess is kept exactly as often as p samples it), and after a kept guess the second
    token follows the next position's distribution."""
    vocab = model.decoder.vocab_size
    first, second = np.full(vocab, -np.inf, np.float32), np.full(vocab, -np.inf, np.float32)
    p1 = {100: 0.5, 200: 0.3, 300: 0.15, 400: 0.05}
    p2 = {500: 0.6, 600: 0.4}
    for logits, p in ((first, p1), (second, p2)):
        for token, prob in p.items():
            logits[token] = np.log(prob)
    rows = np.stack([first, second])
    counts, after_kept, kept = Counter(), Counter(), 0
    n = 8000
    params = GenerationParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=8, seed=1)
    for trial in range(n):
        seq = Sequence([1, 2, 3], params.model_copy(update={"seed": trial}), context=64, eos=frozenset({0}),
                       tokenizer=model.tokenizer)
        seq.state, seq.todo, seq.generated = State.DECODING, [7], [7]  # a sampled token, about to be fed
        seq.draft = [200]
        seq.fed(2, rows)
        counts[seq.generated[1]] += 1
        if seq.usage.accepted_tokens:
            kept += 1
            after_kept[seq.generated[2]] += 1
            assert seq.discard == 0 and seq.todo == seq.generated[2:]
        else:
            assert seq.discard == 1 and seq.todo == seq.generated[1:]
    for token, prob in p1.items():  # within 4.5 standard deviations of a binomial count
        assert abs(counts[token] - n * prob) <= 4.5 * (n * prob * (1 - prob)) ** 0.5, (token, counts)
    assert abs(kept - n * p1[200]) <= 4.5 * (n * 0.3 * 0.7) ** 0.5
    for token, prob in p2.items():
        assert abs(after_kept[token] - kept * prob) <= 4.5 * (kept * prob * (1 - prob)) ** 0.5, after_kept
