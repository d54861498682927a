"""Models by name, as `ollama run` users expect: pull into a library ($EDGELLM_HOME), list, use by name
anywhere a folder is taken, run, remove. Real builds of the built-in SmolLM2 GGUF."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import EDGELLM, ROOT, Broker, DaemonProcess

pytestmark = pytest.mark.slow  # see the README's development section


def edgellm(home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "EDGELLM_HOME": str(home)})


def test_pull_list_use_by_name_run_and_remove(tmp_path):
    home = tmp_path / "home"
    r = edgellm(home, "generate", "--model", "smollm2", "hi")
    assert r.returncode == 1 and "edgellm pull smollm2" in r.stderr  # not there yet: says how to get it
    r = edgellm(home, "run", "smollm2", "What is the capital city of France? Answer in one word.",
                "--max-tokens", "20")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr  # sampled (temperature 0.7), so any answer
    assert "pulled smollm2" in r.stderr and (home / "models/smollm2/manifest.json").is_file()
    assert "[1/4] Reading the source" in r.stderr and "\r" not in r.stderr, r.stderr  # piped: a line a stage
    listed = edgellm(home, "models", "list").stdout
    assert listed.startswith("NAME") and listed.splitlines()[1].startswith("smollm2") and "int4" in listed
    assert "LlamaForCausalLM" in listed
    r = edgellm(home, "generate", "--model", "smollm2", "--temperature", "0", "--max-tokens", "20",
                "What is the capital city of Italy? Answer in one word.")
    assert r.returncode == 0 and "Rome" in r.stdout, r.stderr
    assert "already in the library" in edgellm(home, "pull", "smollm2").stderr  # no second build
    from edgellm.models.building.sources import builtin_gguf

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.symlink_to(builtin_gguf())
    r = edgellm(home, "run", str(gguf), "Say hi.", "--max-tokens", "5")  # a .gguf path, pulled under its stem
    assert r.returncode == 0 and (home / "models/smollm2-135m-instruct/manifest.json").is_file(), r.stderr
    assert '"name": "smollm2"' in edgellm(home, "models", "show", "smollm2", "--json").stdout
    broker = Broker(tmp_path).start()  # the service's model.path may be a name too
    daemon = DaemonProcess(tmp_path, broker.port, Path("smollm2"), env={"EDGELLM_HOME": str(home)})
    try:
        assert daemon.start().wait_online()["model"]["name"] == "smollm2"
    finally:
        daemon.stop()
        broker.stop()
    assert edgellm(home, "models", "rm", "smollm2").returncode == 0
    assert edgellm(home, "models", "rm", "smollm2-135m-instruct").returncode == 0
    assert "no models in" in edgellm(home, "models", "list").stdout
    r = edgellm(home, "models", "rm", "../etc")
    assert r.returncode == 2 and "NAME" in r.stderr
