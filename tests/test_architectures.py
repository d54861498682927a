"""Every supported architecture exports, matches PyTorch, quantizes and generates."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.models.building.fused_graph import FUSED_TYPES
from tests.conftest import build
from tests.tiny_models import ARCHITECTURES

PROMPT = "The invoice total is due"
DECODE_STEPS = 5


def torch_logits(source, ids: list[int]) -> list[np.ndarray]:
    """Prompt logits, then one row per greedy step decoded with PyTorch's own KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        rows.append(out.logits[0].numpy())
        for _ in range(DECODE_STEPS):
            token = int(out.logits[0, -1].argmax())
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[0].numpy())
    return rows


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp32_onnx_matches_pytorch_with_kv_cache(arch, tiny_sources, tmp_path):
    out = build(tiny_sources[arch], tmp_path / "fp32", "fp32")
    model = LoadedModel.load(out)
    assert model.manifest.model_type == arch
    fused = arch in FUSED_TYPES
    assert model.manifest.graph == ("fused" if fused else "optimum")
    assert model.decoder.in_place == fused
    ops = {n.op_type for n in __import__("onnx").load(out / "model.onnx", load_external_data=False).graph.node}
    assert ("GroupQueryAttention" in ops) == fused
    ids = model.encode(PROMPT)
    expected = torch_logits(tiny_sources[arch], ids)
    cache = model.decoder.new_cache()
    got = [model.decoder.forward(ids, cache, all_logits=True)]
    for _ in range(DECODE_STEPS):
        got.append(model.decoder.forward([int(got[-1][-1].argmax())], cache))
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape
        assert np.abs(g - e).max() < 1e-4, f"{arch} step {step}: max abs diff {np.abs(g - e).max():.2e}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_builds_load_and_generate(arch, scheme, tiny_sources, tmp_path):
    out = build(tiny_sources[arch], tmp_path / scheme, scheme)
    model = LoadedModel.load(out, verify_hashes=True)
    q = model.manifest.quantization
    assert (q.scheme, q.bits) == (scheme, int(scheme[3:]))
    nodes = {n.op_type for n in __import__("onnx").load(out / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in nodes
    generator = Generator(model)
    result = generator.generate(generator.prompt_ids(PROMPT, raw=True), GenerationParams(max_tokens=8,
                                                                                         temperature=0))
    assert result.usage.completion_tokens >= 1
    assert result.finish_reason in ("stop", "length")
    assert model.manifest.quality.perplexity > 1


def test_in_place_cache_grows_past_its_capacity(tiny_sources, tmp_path):
    """A fused model's cache is preallocated; a longer conversation than announced must still be exact."""
    model = LoadedModel.load(build(tiny_sources["llama"], tmp_path / "fp32", "fp32"))
    ids = (model.encode(PROMPT) * 100)[:300]
    small, large = model.decoder.new_cache(capacity=8), model.decoder.new_cache(capacity=512)
    assert small.capacity < 300 <= large.capacity
    for start in range(0, 300, 50):
        a = model.decoder.forward(ids[start:start + 50], small, all_logits=True)
        b = model.decoder.forward(ids[start:start + 50], large, all_logits=True)
        assert np.array_equal(a, b)
    assert small.capacity >= 300 and small.length == large.length == 300
    assert all(np.array_equal(x, y) for x, y in zip(small.prefix(), large.prefix(), strict=True))
