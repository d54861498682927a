"""Shared fixtures: real models, built once per session with the real toolchain."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from tests.tiny_models import make_tiny_model

settings.register_profile("full", max_examples=10_000)  # each fuzz test asks for its own count under this cap
settings.register_profile("dev", max_examples=200)


def pytest_configure(config) -> None:
    """`pytest -m "not slow"` (the quick run while working) fuzzes with 200 examples a test; the full suite with
    what each test asks for. HYPOTHESIS_PROFILE chooses either explicitly."""
    quick = "not slow" in (config.option.markexpr or "")
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("dev" if quick else "full"))


def build(source: str | Path, out: Path, scheme: str):
    from edgellm.models.building.build import build_model
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec

    build_model(str(source), out, BuildOptions(QuantSpec(scheme), show_progress=False))
    return out


class TinySources(dict):
    """Tiny HF model folders by architecture, made on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        self[arch] = make_tiny_model(arch, self.root / arch)
        return self[arch]


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> TinySources:
    return TinySources(tmp_path_factory.mktemp("tiny-sources"))


@pytest.fixture(scope="session")
def smollm2_int4(tmp_path_factory) -> Path:
    return build("smollm2", tmp_path_factory.mktemp("smollm2") / "int4", "int4")


@pytest.fixture(scope="session")
def smollm2_int8(tmp_path_factory) -> Path:
    return build("smollm2", tmp_path_factory.mktemp("smollm2") / "int8", "int8")


@pytest.fixture(scope="session")
def smollm2(smollm2_int4):
    """The int4 build, loaded once, with a generator."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel

    return Generator(LoadedModel.load(smollm2_int4, threads=2))


@pytest.fixture(scope="session")
def minilm_int8(tmp_path_factory) -> Path:
    from edgellm.models.building.embedding_build import build_embedding
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec

    out = tmp_path_factory.mktemp("minilm") / "int8"
    build_embedding("minilm", out, BuildOptions(QuantSpec("int8"), show_progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_wide_llama(tmp_path_factory):
    """Rows of 256 and more, as K-quant super-blocks need (real 1B+ models have them everywhere)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import tiny_tokenizer

    folder = tmp_path_factory.mktemp("wide-llama")
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def broker(tmp_path):
    """A mosquitto of its own for one test (tests/harness.py Broker)."""
    from tests.harness import Broker

    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def watch(broker):
    """The update reports devices publish on `broker`."""
    from tests.harness import UpdateWatch

    w = UpdateWatch(broker.port)
    yield w
    w.close()


@pytest.fixture
def daemon_factory(tmp_path, smollm2_int4):
    """Daemons serving SmolLM2 from one state folder (so a restart finds the journal), killed at the end if a
    test left them running. `make(port, device=..., edgellm_limits__grace_seconds=0.3)`: keyword settings
    become environment variables."""
    from tests.harness import DaemonProcess

    started: list[DaemonProcess] = []

    def make(port: int, device: str = "dev1", **env) -> DaemonProcess:
        d = DaemonProcess(tmp_path, port, smollm2_int4, device=device,
                          env={k.upper(): str(v) for k, v in env.items()})
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()


@pytest.fixture
def passes(monkeypatch):
    """Every sequence's passes, as (tokens fed, logits [positions, vocab], tokens of them discarded after: a
    rejected draft), in the order sequences first ran."""
    from edgellm.daemon.engine.sequence import Sequence

    record: dict[Sequence, list[tuple[list[int], np.ndarray, int]]] = {}  # keeps them alive: no id reuse
    fed = Sequence.fed

    def recording(self, n, logits):
        # recorded before the pass is handed over: its Result may wake the test's thread
        discards = len(logits) - 1 if self.draft else 0  # at most; the rows after the last kept one
        runs = record.setdefault(self, [])
        runs.append((self.next_feed()[:n], logits.copy(), discards))
        prompt_done = fed(self, n, logits)
        runs[-1] = (*runs[-1][:2], self.discard)
        return prompt_done

    monkeypatch.setattr(Sequence, "fed", recording)
    return record
