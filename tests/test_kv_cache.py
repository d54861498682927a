"""The KV cache in float16 (`model build --kv-cache float16`): half the memory of float32 for a perplexity
within 1% on the real SmolLM2 file; the default stays float32, which decodes faster on these CPUs
(docs/measured-facts.md, "The KV cache's type")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.models.building.build import build_model
from edgellm.models.building.options import BuildOptions
from edgellm.models.building.quantize import QuantSpec


@pytest.mark.slow
def test_a_float16_cache_halves_the_pool_and_keeps_the_perplexity(smollm2_int4, tmp_path):
    half = tmp_path / "kv16"
    build_model("smollm2", half, BuildOptions(QuantSpec("int4"), show_progress=False, kv_cache="float16"))
    small, full = (json.loads((f / "manifest.json").read_text()) for f in (half, smollm2_int4))
    assert (small["quantization"]["kv_cache"], full["quantization"]["kv_cache"]) == ("float16", "float32")
    # the same file, the same text: float16 keys and values cost at most 1% of perplexity
    assert small["quality"]["perplexity"] <= 1.01 * full["quality"]["perplexity"], (small["quality"], full["quality"])
    pools = []
    for folder in (half, smollm2_int4):
        g = Generator(LoadedModel.load(folder, threads=2), batch_rows=4, batch_context=512)
        r = g.generate(g.prompt_ids("What is the capital city of France? Answer in one word."),
                       GenerationParams(max_tokens=8, temperature=0))
        assert "Paris" in r.text
        pools.append(g.scheduler.pool_bytes)
    assert pools[0] * 2 == pools[1] and pools[0] == 4 * 128 * 30 * 2 * 3 * 64 * 2  # rows, positions, layers, k+v


@pytest.mark.slow
def test_the_pool_grows_with_its_longest_row(smollm2_int4):
    """Four rows of 512 positions are not committed at load: the pool holds one page a row and grows (copying what
    it holds, binding again) as a request outgrows it, and the answer is the one computed alone."""
    model = LoadedModel.load(smollm2_int4, threads=2)
    per_position = 4 * 30 * 2 * 3 * 64 * 4  # rows, layers, k+v, kv heads, head size, float32
    g = Generator(model, batch_rows=4, batch_context=512)
    assert g.scheduler.pool_bytes == 128 * per_position
    prompt = g.prompt_ids("Summarise this text. " + " ".join(["The invoice is due in thirty days."] * 34))
    assert 300 < len(prompt) < 380
    params = GenerationParams(max_tokens=120, temperature=0, ignore_eos=True)
    got = g.generate(prompt, params)
    assert g.scheduler.pool_bytes == 512 * per_position  # 128 -> 384 for the prompt -> 512 while decoding
    alone = Generator(model).generate(prompt, params)
    assert got.text == alone.text and got.usage.completion_tokens == 120


def test_the_default_cache_is_float32(tiny_sources, tmp_path):
    out = tmp_path / "int8"
    build_model(str(tiny_sources["llama"]), out, BuildOptions(QuantSpec("int8"), show_progress=False))
    model = LoadedModel.load(out)
    assert model.decoder.kv_dtype == np.float32 and model.manifest.quantization.kv_cache == "float32"
