"""Stop strings, incremental detokenization and sampling on their own."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from edgellm.daemon.engine.detokenize import IncrementalDecoder
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.engine.sampling import Sampler
from edgellm.daemon.engine.stops import StopFilter
from tests.tiny_models import tiny_tokenizer


def run_filter(chunks, stops):
    f = StopFilter(stops)
    out, stopped = [], False
    for c in chunks:
        text, stopped = f.push(c)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(f.flush())
    return "".join(out), stopped, out


def test_stop_string_split_across_chunks_is_never_shown():
    text, stopped, pieces = run_filter(["Hello wor", "ld<", "|e", "nd|> more"], ["<|end|>"])
    assert (text, stopped) == ("Hello world", True)
    assert all("<" not in p for p in pieces)


def test_held_back_text_is_released_when_it_is_not_a_stop():
    text, stopped, _ = run_filter(["a <", "b> c <|"], ["<|end|>"])
    assert (text, stopped) == ("a <b> c <|", False)


def test_earliest_of_several_stops_wins():
    assert run_filter(["x END y STOP"], ["STOP", "END"])[0] == "x "


def test_incremental_decoding_never_splits_a_character():
    tok = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    text = "Factura: 1.234,56 € — café, 日本語 🙂 done"
    ids = tok.encode(text).ids
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push([i]) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # multi-byte characters spanned tokens and were held


def test_greedy_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert Sampler(GenerationParams(temperature=0))(logits.copy(), []) == 0
    top1 = Sampler(GenerationParams(temperature=1.0, top_k=1, seed=1))
    assert {top1(logits.copy(), []) for _ in range(50)} == {0}
    nucleus = Sampler(GenerationParams(temperature=1.0, top_k=0, top_p=0.7, seed=1))
    assert {nucleus(logits.copy(), []) for _ in range(200)} == {0, 1}


def test_repetition_penalty_moves_away_from_recent_tokens():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    s = Sampler(GenerationParams(temperature=0, repetition_penalty=1.5))
    assert s(logits.copy(), [0]) == 1


def test_frequency_and_presence_penalties_subtract_as_llama_cpp_does():
    logits = np.array([2.0, 1.5, 1.0], dtype=np.float32)
    once = Sampler(GenerationParams(temperature=0, presence_penalty=0.6))
    assert once(logits.copy(), [0]) == 1  # 2.0 - 0.6 < 1.5
    often = Sampler(GenerationParams(temperature=0, frequency_penalty=0.3))
    assert often(logits.copy(), [0]) == 0 and often(logits.copy(), [0, 0]) == 1  # 2.0 - 2 x 0.3 < 1.5
    encouraged = Sampler(GenerationParams(temperature=0, presence_penalty=-1.5))
    assert encouraged(logits.copy(), [2]) == 2


def test_min_p_drops_tokens_far_less_likely_than_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = Sampler(GenerationParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=1))
    assert {s(logits.copy(), []) for _ in range(300)} == {0, 1}  # 0.15 < 0.5 x 0.5
    hot = Sampler(GenerationParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.25, seed=1))
    assert {hot(logits.copy(), []) for _ in range(300)} == {0, 1, 2}  # before temperature, as llama.cpp


def test_masked_logits_are_never_sampled():
    logits = np.array([5.0, -np.inf, 1.0, -np.inf], dtype=np.float32)
    s = Sampler(GenerationParams(temperature=2.0, top_k=0, top_p=1.0, seed=3))
    assert {s(logits.copy(), []) for _ in range(200)} <= {0, 2}


def test_a_denormal_temperature_samples_like_greedy():
    """Found by the MQTT fuzzer: temperature 2e-311 made logits/T overflow to inf, and inf - inf is NaN."""
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    for temperature in (2.225073858507e-311, 5e-324, 1e-300):
        s = Sampler(GenerationParams(temperature=temperature, seed=0))
        assert {s(logits.copy(), []) for _ in range(20)} == {1}
