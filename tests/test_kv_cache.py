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
        pools.append(sum(a.nbytes for a in g.scheduler._pool))
        r = g.generate(g.prompt_ids("What is the capital city of France? Answer in one word."),
                       GenerationParams(max_tokens=8, temperature=0))
        assert "Paris" in r.text
    assert pools[0] * 2 == pools[1] and pools[0] == 4 * 512 * 30 * 2 * 3 * 64 * 2  # rows, positions, layers, k+v


def test_the_default_cache_is_float32(tiny_sources, tmp_path):
    out = tmp_path / "int8"
    build_model(str(tiny_sources["llama"]), out, BuildOptions(QuantSpec("int8"), show_progress=False))
    model = LoadedModel.load(out)
    assert model.decoder.kv_dtype == np.float32 and model.manifest.quantization.kv_cache == "float32"
