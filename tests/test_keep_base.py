"""`model build --keep-base`: a LoRA merged into a 4-bit GGUF base, built with the base's blocks exact and the
change beside them in fp32, computes what the merged model does; rounding the merged weights to 4 bits again
loses most of a change smaller than a 4-bit step (as a LoRA's is)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from edgellm.daemon.engine.manifest import load_manifest
from tests.gguf_files import write_gguf
from tests.harness import EDGELLM, ROOT
from tests.test_gguf_build import engine_logits

pytestmark = pytest.mark.slow  # see the README's development section

RANK = 2


def build(source, out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, "model", "build", str(source), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def fake_merge(gguf, reference, out) -> None:
    """What `lora merge` leaves: the base's weights plus a rank-2 change to every projection, and the lineage."""
    shutil.copytree(reference, out)
    rng = np.random.default_rng(1)
    (path,) = out.glob("*.safetensors")
    state = load_file(path)
    for name, w in state.items():
        if name.endswith("_proj.weight"):
            up, down = rng.standard_normal((w.shape[0], RANK)), rng.standard_normal((RANK, w.shape[1]))
            change = up @ down
            state[name] = (w + 0.1 * np.abs(w).mean() * change / np.abs(change).mean()).astype(np.float32)
    save_file(state, path, metadata={"format": "pt"})
    (out / "edgellm-lineage.json").write_text(json.dumps({"base": str(gguf),
                                                          "training": {"options": {"rank": RANK}}}))


def test_keep_base_computes_what_the_merged_model_does(tiny_sources, tmp_path):
    gguf, reference = write_gguf(tiny_sources["llama"], tmp_path / "base.gguf", {}, default="Q4_1")
    fake_merge(gguf, reference, tmp_path / "merged")
    for name, flags in {"fp32": ["--quant", "fp32"], "int4": [], "keep": ["--keep-base"]}.items():
        done = build(tmp_path / "merged", tmp_path / name, *flags)
        assert done.returncode == 0, done.stderr
    want = engine_logits(tmp_path / "fp32")
    error = {name: max(np.abs(g - w).max() for g, w in zip(engine_logits(tmp_path / name), want, strict=True))
             for name in ("int4", "keep")}
    scale = max(np.abs(w).max() for w in want)
    assert error["keep"] < 0.02 * scale  # int8 activations only (accuracy level 4)
    assert error["keep"] * 4 < error["int4"], error
    method = load_manifest(tmp_path / "keep").quantization.method
    assert "--keep-base" in method and "Q4_1" in method


def test_keep_base_names_what_it_needs(tiny_sources, tmp_path):
    gguf, _ = write_gguf(tiny_sources["llama"], tmp_path / "base.gguf", {}, default="Q4_1")
    done = build(gguf, tmp_path / "out", "--keep-base")
    assert done.returncode == 2
    assert "--keep-base" in done.stderr and "lora merge" in done.stderr
