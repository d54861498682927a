"""Building from a GGUF without torch: the fused graph from the file's own tensors and header, every common
block type kept exactly, the tokenizer as llama.cpp reads it, and memory and staging that a device can afford.

Each GGUF here is written from a tiny random model as llama.cpp's converter would (tests/gguf_files.py), with a
Hugging Face folder of exactly the weights the GGUF holds beside it: PyTorch's answer to compare with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edgellm.daemon.engine.manifest import load_manifest
from edgellm.daemon.engine.model import LoadedModel
from tests.gguf_files import write_gguf
from tests.harness import EDGELLM, ROOT
from tests.test_architectures import DECODE_STEPS, PROMPT, torch_logits

# A device install has no torch, transformers or optimum: the build runs with them blocked.
NO_TORCH = ("import sys\n"
            "for m in ('torch', 'transformers', 'optimum', 'peft', 'accelerate'):\n"
            "    sys.modules[m] = None\n"
            "from edgellm.daemon.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def build_without_torch(gguf, out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, "model", "build", str(gguf), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def engine_logits(folder) -> list[np.ndarray]:
    model = LoadedModel.load(folder)
    ids = model.encode(PROMPT)
    cache = model.decoder.new_cache()
    rows = [model.decoder.forward(ids, cache, all_logits=True)]
    for _ in range(DECODE_STEPS):
        rows.append(model.decoder.forward([int(rows[-1][-1].argmax())], cache))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi", "phi3", "qwen3", "gemma3_text"])
def test_a_gguf_builds_without_torch_and_computes_what_pytorch_does(arch, tiny_sources, tmp_path):
    gguf, reference = write_gguf(tiny_sources[arch], tmp_path / f"{arch}.gguf", {"attn_v": "Q4_1", "ffn": "Q4_0"})
    out = build_without_torch(gguf, tmp_path / "fp32", "--quant", "fp32")
    assert out.returncode == 0, out.stderr
    m = load_manifest(tmp_path / "fp32")
    assert m.graph == "fused" and m.source.kind == "gguf" and m.quality.source_perplexity is None
    ids = LoadedModel.load(tmp_path / "fp32").encode(PROMPT)
    for step, (got, want) in enumerate(zip(engine_logits(tmp_path / "fp32"), torch_logits(reference, ids),
                                           strict=True)):
        assert np.abs(got - want).max() < 1e-4, f"{arch} step {step}: {np.abs(got - want).max():.2e}"


@pytest.mark.slow
def test_k_quants_are_kept_exactly_and_mixed_widths_share_a_layer(tmp_path, tiny_wide_llama):
    """A Q4_K_M-like file: Q4_K projections, Q6_K values and down projections, a Q5_K gate, a Q5_0 up."""
    types = {"attn_v": "Q6_K", "ffn_down": "Q6_K", "ffn_gate": "Q5_K", "ffn_up": "Q5_0", "token_embd": "Q6_K"}
    gguf, reference = write_gguf(tiny_wide_llama, tmp_path / "km.gguf", types, default="Q4_K")
    out = build_without_torch(gguf, tmp_path / "int4", "--quant", "int4")
    assert out.returncode == 0, out.stderr
    q = load_manifest(tmp_path / "int4").quantization
    assert q.gguf_imported == {"Q4_K": 6, "Q6_K": 5, "Q5_K": 2, "Q5_0": 2} and q.rounded_weights is None, q
    ids = LoadedModel.load(tmp_path / "int4").encode(PROMPT)
    for got, want in zip(engine_logits(tmp_path / "int4"), torch_logits(reference, ids), strict=True):
        # the weights are the GGUF's; what differs is onnxruntime's int8 rounding of activations
        assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


@pytest.mark.slow
def test_a_type_without_an_exact_form_is_named(tmp_path, tiny_wide_llama):
    gguf, _ = write_gguf(tiny_wide_llama, tmp_path / "q3.gguf", {"ffn_down": "Q3_K"}, default="Q4_K")
    out = build_without_torch(gguf, tmp_path / "int4", "--quant", "int4")
    assert out.returncode == 0, out.stderr
    q = load_manifest(tmp_path / "int4").quantization
    assert q.rounded_weights == ["blk.0.ffn_down.weight (Q3_K)", "blk.1.ffn_down.weight (Q3_K)"]
    assert "rounded again" in q.method


@pytest.mark.slow
def test_the_tokenizer_adds_bos_only_when_the_gguf_says_so(tiny_sources, tmp_path):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_sources["llama"] / "tokenizer.json"))
    for add_bos in (False, True):
        gguf, _ = write_gguf(tiny_sources["llama"], tmp_path / f"bos{add_bos}.gguf", {}, add_bos=add_bos)
        out = build_without_torch(gguf, tmp_path / f"m{add_bos}", "--quant", "int8")
        assert out.returncode == 0, out.stderr
        ours = Tokenizer.from_file(str(tmp_path / f"m{add_bos}" / "tokenizer.json"))
        text = "The invoice total is 1,234.56 EUR.<|im_end|>\nLa factura"
        plain = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == plain  # llama.cpp's split, the same merges
        bos = json.loads((tmp_path / f"m{add_bos}" / "manifest.json").read_text())["generation"]["bos_token_id"]
        assert ours.encode(text).ids == ([bos] if add_bos else []) + plain


def test_smollm2s_raw_prompt_starts_as_llama_cpp_does(smollm2_int4):
    """Its GGUF says add_bos_token = false: a raw prompt is the text's tokens alone, so the first greedy token
    is llama.cpp's (" calculated"), where the transformers-converted tokenizer prepended <|im_start|>."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.params import GenerationParams

    g = Generator(LoadedModel.load(smollm2_int4, threads=2))
    ids = g.prompt_ids("The invoice total is", raw=True)
    assert ids == g.model.encode("The invoice total is", add_special_tokens=False)
    first = g.generate(ids, GenerationParams(max_tokens=1, temperature=0)).text
    assert first == " calculated"


RESIDENT_WEIGHTS = """
import sys, onnxruntime as ort
from pathlib import Path
from edgellm.daemon.engine.decoder import cpu_session, release_mapped_weights
folder = Path(sys.argv[1]).resolve()
def resident():  # kB of the weights file's pages resident for this process alone: pages another process
    kb, inside = 0, False  # maps too (the test run's own session of the model) are neither its cost nor its to drop
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ")[0] and len(line.split()) >= 5 and not line.split()[0].endswith(":"):
            inside = line.rstrip().endswith(str(folder / "model.onnx.data"))
        elif inside and line.startswith(("Private_Clean:", "Private_Dirty:")):
            kb += int(line.split()[1])
    return kb
session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
before = resident()
release_mapped_weights(folder)
print(before, resident())
"""


def test_a_loaded_model_keeps_only_what_it_reads_resident(smollm2_int4):
    """onnxruntime keeps the weights file mapped after packing the matrices (their scales stay resident); the
    engine's sessions let those pages go, so a model's memory is its packed weights and little else."""
    done = subprocess.run([sys.executable, "-c", RESIDENT_WEIGHTS, str(smollm2_int4)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    before, after = (int(x) for x in done.stdout.split())
    data_kb = (smollm2_int4 / "model.onnx.data").stat().st_size // 1024
    assert before > data_kb * 0.1  # what onnxruntime alone keeps (the scales, the tied table it touched)
    assert after < data_kb * 0.02


@pytest.mark.slow
def test_a_killed_build_leaves_a_staging_folder_the_next_build_removes(tmp_path, tiny_wide_llama):
    gguf, _ = write_gguf(tiny_wide_llama, tmp_path / "k.gguf", {}, default="Q4_K")
    out = tmp_path / "models" / "m"
    out.parent.mkdir()
    child = subprocess.Popen([*EDGELLM, "model", "build", str(gguf), "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(".m.building-*")):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert list(out.parent.glob(".m.building-*"))  # what the kill left
    done = build_without_torch(gguf, out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]


@pytest.mark.slow
def test_a_phi2_gguf_builds_where_transformers_cannot_read_it(tiny_sources, tmp_path):
    """With the host toolchain installed, the optional source perplexity goes through transformers' GGUF loader,
    which has no phi2: the build goes on and the manifest says why it was skipped."""
    gguf, _ = write_gguf(tiny_sources["phi"], tmp_path / "phi.gguf", {})
    out = subprocess.run([*EDGELLM, "model", "build", str(gguf), "--out", str(tmp_path / "int8"), "--quant", "int8"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    q = load_manifest(tmp_path / "int8").quality
    assert q.source_perplexity is None and "phi2" in q.source_perplexity_skipped
    assert "source not measured: transformers could not run the source" in out.stdout + out.stderr
