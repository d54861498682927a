"""`model build` refuses bad sources and impossible builds clearly, and never leaves a half-written folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edgellm.models.building.build import build_model
from edgellm.models.building.options import BuildOptions
from edgellm.models.building.quantize import QuantSpec
from edgellm.models.building.sources import builtin_gguf
from edgellm.models.errors import BuildError
from tests.harness import EDGELLM

OPTIONS = BuildOptions(QuantSpec("int4"), show_progress=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(BuildError, match="architecture 'bert'.*supported: .*llama.*phi"):
        build_model(str(tmp_path / "bert"), tmp_path / "out", OPTIONS)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_truncated_gguf_is_refused_before_loading(tmp_path):
    data = builtin_gguf().read_bytes()
    truncated = tmp_path / "smol.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BuildError, match="truncated"):
        build_model(str(truncated), tmp_path / "out", OPTIONS)
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(BuildError, match="not a GGUF file"):
        build_model(str(tmp_path / "notgguf.gguf"), tmp_path / "out", OPTIONS)


def test_missing_source_and_existing_output(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        build_model(str(tmp_path / "nothing-here"), tmp_path / "out", OPTIONS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no config.json"):
        build_model(str(tmp_path / "empty"), tmp_path / "out", OPTIONS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(BuildError, match="--force"):
        build_model("smollm2", tmp_path / "out", OPTIONS)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_too_little_disk_is_refused_before_starting(small_disk, tiny_sources):
    with pytest.raises(BuildError, match=r"--out: .* MB free; .*needs about \d+ MB"):
        build_model(str(tiny_sources["llama"]), small_disk / "model", OPTIONS)
    assert list(small_disk.iterdir()) == []


def test_a_rebuild_replaces_the_folder_whole(tiny_sources, tmp_path):
    out = tmp_path / "m"
    build_model(str(tiny_sources["qwen2"]), out, BuildOptions(QuantSpec("int8"), show_progress=False))
    first = (out / "manifest.json").read_text()
    assert '"scheme": "int8"' in first
    build_model(str(tiny_sources["qwen2"]), out, BuildOptions(QuantSpec("int4"), force=True, show_progress=False))
    assert '"scheme": "int4"' in (out / "manifest.json").read_text()
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [[], ["--no-fuse"]])
def test_a_built_folder_is_readable_by_another_user(tiny_sources, tmp_path, fuse):
    """The service runs as its own user: every built file is 0644 whatever the builder's umask or the
    quantizer's temporary files."""
    out = tmp_path / "m"
    r = subprocess.run([*EDGELLM, "model", "build", str(tiny_sources["llama"]), "--out", str(out), *fuse],
                       capture_output=True, text=True, preexec_fn=lambda: os.umask(0o077))
    assert r.returncode == 0, r.stderr
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        p.name: "0o644" for p in out.iterdir()}
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_build_errors_name_the_flag(tmp_path):
    r = run_cli("model", "build", "smollm2", "--out", str(tmp_path / "x"), "--block-size", "24")
    assert r.returncode == 2 and "--block-size" in r.stderr
    r = run_cli("model", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("error: SOURCE:")


def test_a_gguf_architecture_not_described_is_refused_by_name_on_a_device(tmp_path):
    """Without the host toolchain there is no export to fall back on: the refusal names the architecture and
    the ones the fused graph covers."""
    import gguf
    import numpy as np

    from tests.test_gguf_build import build_without_torch

    writer = gguf.GGUFWriter(tmp_path / "sc2.gguf", "starcoder2")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = build_without_torch(tmp_path / "sc2.gguf", tmp_path / "out")
    assert out.returncode == 2, out.stderr
    assert "'starcoder2'" in out.stderr and "gemma3, llama, phi2, phi3, qwen2, qwen3" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_a_rotary_the_attention_cannot_take_is_refused_at_build_time(tmp_path):
    """GroupQueryAttention rotates half-widths that are multiples of 8: 12 of 80 dims (a Phi-style partial
    rotary) would build, then fail on its first run."""
    from transformers import PhiConfig, PhiForCausalLM

    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=160, intermediate_size=320, num_attention_heads=2,
                       num_hidden_layers=1, partial_rotary_factor=0.15, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    PhiForCausalLM(config).save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    with pytest.raises(BuildError, match="rotates 12 of each head's 80 dimensions.*multiple of 16"):
        build_model(str(tmp_path / "phi"), tmp_path / "out", BuildOptions(QuantSpec("fp32"), show_progress=False))
    assert not (tmp_path / "out").exists()
