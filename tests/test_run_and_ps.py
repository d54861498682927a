"""`edgellm run`, `ps` and the chat REPL as `ollama run` users drive them: flags anywhere, --system, --format,
/commands, Ctrl-C that stops an answer and not the session, and a running daemon answering (warm) instead of a
second copy of the model. Real CLI processes, a real daemon, a real mosquitto."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import EDGELLM, ROOT, Broker, DaemonProcess, free_port, wait_for_port, wait_until

pytestmark = pytest.mark.slow  # each test starts CLI processes that load the model


@pytest.fixture
def home(tmp_path, smollm2_int4) -> Path:
    """A library holding the SmolLM2 build as `smollm2`, imported with `pull FOLDER` (a copy, no rebuild)."""
    home = tmp_path / "home"
    r = edgellm(home, "pull", str(smollm2_int4), "--name", "smollm2")
    assert r.returncode == 0 and (home / "models/smollm2/manifest.json").is_file(), r.stderr
    return home


def edgellm(home: Path, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *args], cwd=ROOT, capture_output=True, text=True, input=stdin, timeout=300,
                          env={**os.environ, "EDGELLM_HOME": str(home), **env})


def test_run_takes_flags_anywhere_a_system_message_and_a_format(home, tmp_path):
    r = edgellm(home, "run", "smollm2", "--max-tokens", "8", "Count to twenty.")  # a flag before the prompt
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = edgellm(home, "run", "smollm2", "What", "is", "the", "capital", "of", "France?", "--temperature", "0",
                "--max-tokens", "10", "--system", "Answer in one word.")  # words joined, as ollama does
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    r = edgellm(home, "run", "smollm2", "--format", "json", "--temperature", "0", "--max-tokens", "40",
                "Describe a cat as JSON.")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict), r.stdout
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"], "additionalProperties": False}))
    r = edgellm(home, "run", "smollm2", "--format", str(schema), "--temperature", "0", "--max-tokens", "30",
                "Which city is the capital of France?")
    assert r.returncode == 0 and set(json.loads(r.stdout)) == {"city"}, r.stdout
    r = edgellm(home, "run", "smollm2", "--temprature", "0", "hi")
    assert r.returncode == 2 and "edgellm run" in r.stderr and "--temprature" in r.stderr  # its own usage
    r = edgellm(home, "run", "smollm2", "--format", str(tmp_path / "missing.json"), "hi")
    assert r.returncode == 2 and "--format: cannot read" in r.stderr


def test_the_repl_commands_are_never_sent_to_the_model(home):
    script = ("/help\n/set parameter temperature 0\n/set parameter temprature 1\n/set parameter top_k -3\n"
              "/set system Answer in one word.\n/show\n/show parameters\n/frobnicate\n"
              "What is the capital of France?\n/bye\nThis line is after /bye.\n")
    r = edgellm(home, "run", "smollm2", "--max-tokens", "10", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "/set parameter NAME VALUE" in r.stderr  # /help
    assert "Set parameter 'temperature' to 0" in r.stderr
    assert "temprature is not a parameter" in r.stderr and "/set parameter top_k:" in r.stderr
    assert "System message\n  Answer in one word." in r.stderr and "temperature          0" in r.stderr
    assert "Unknown command '/frobnicate'" in r.stderr
    assert r.stdout.count("\n") == 1 and "Paris" in r.stdout  # one answer: commands and the line after /bye are not


def test_ctrl_c_stops_the_answer_not_the_session(home):
    proc = subprocess.Popen([*EDGELLM, "run", "smollm2", "--max-tokens", "3000", "--ignore-eos", "--local"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "EDGELLM_HOME": str(home)})
    proc.stdin.write("Write a very long story about the sea.\n")
    proc.stdin.flush()
    os.set_blocking(proc.stdout.fileno(), False)
    wait_until(lambda: proc.stdout.read(1), timeout=120)  # the answer has started
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write("/set parameter ignore_eos false\n/set parameter max_tokens 5\nSay hi.\n/bye\n")
    proc.stdin.flush()
    os.set_blocking(proc.stdout.fileno(), True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # not 130: the session went on and ended with /bye
    assert "[stopped]" in err and "Set parameter 'max_tokens' to 5" in err and out.strip()


@pytest.mark.parametrize("transport", ["mqtt", "http"])
def test_run_and_ps_use_the_daemon_serving_the_model(home, tmp_path, transport):
    broker = Broker(tmp_path).start() if transport == "mqtt" else None
    http_port = free_port()
    env = {"EDGELLM_HOME": str(home)}
    if transport == "http":
        env.update(EDGELLM_MQTT__ENABLED="false", EDGELLM_HTTP__ENABLED="true", EDGELLM_HTTP__PORT=str(http_port))
    daemon = DaemonProcess(tmp_path, broker.port if broker else free_port(), Path("smollm2"), env=env)
    try:
        daemon.start(wait=False)
        if broker:
            daemon.wait_online()
        else:
            wait_for_port(http_port, timeout=60)
        ps = edgellm(home, "ps")
        assert ps.stdout.splitlines()[0].split() == ["NAME", "PID", "MEMORY", "LOADED", "EMBEDDING", "SERVES"]
        assert f"smollm2   {daemon.proc.pid}" in ps.stdout and " MB " in ps.stdout, ps.stdout
        listed = json.loads(edgellm(home, "ps", "--json").stdout)
        assert [d["pid"] for d in listed] == [daemon.proc.pid] and listed[0]["rss_bytes"] > 50e6
        r = edgellm(home, "run", "smollm2", "--temperature", "0", "--max-tokens", "10",
                    "What is the capital of France? Answer in one word.")
        assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
        r = edgellm(home, "run", "smollm2", "--max-tokens", "5", stdin="/show info\nHello\n/bye\n")
        assert f"served by the daemon with pid {daemon.proc.pid}" in r.stderr, r.stderr
        served = daemon.log.read_text()
        assert served.count("chat id=") == 2, served[-1500:]  # the daemon answered both, not a local copy
        r = edgellm(home, "models", "rm", "smollm2")
        assert r.returncode == 2 and f"pid {daemon.proc.pid}" in r.stderr and "--force" in r.stderr
        assert (home / "models/smollm2/manifest.json").is_file()
    finally:
        assert daemon.stop() == 0
        if broker:
            broker.stop()
    assert "no edgellm daemon is running" in edgellm(home, "ps").stdout  # its record left with it
    assert edgellm(home, "models", "rm", "smollm2").returncode == 0


def test_models_list_show_and_names_for_the_embedding_model(home, tmp_path, minilm_int8):
    r = edgellm(home, "pull", str(minilm_int8), "--name", "minilm")
    assert r.returncode == 0, r.stderr
    lines = edgellm(home, "models", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED", "KIND", "QUANT", "ARCHITECTURE"]
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[1:])}  # columns: 2+ spaces
    assert rows["minilm"][4] == "embedding" and rows["smollm2"][4] == "chat" and rows["smollm2"][5] == "int4"
    assert rows["smollm2"][2].endswith(" MB") and rows["smollm2"][3] == "just now" and len(rows["smollm2"][1]) == 12
    summary = edgellm(home, "models", "show", "smollm2").stdout
    assert "context length   8192 tokens" in summary and "License\n    apache-2.0" in summary, summary
    assert "parameters       135M" in summary and "quantization     int4" in summary
    assert json.loads(edgellm(home, "models", "show", "smollm2", "--json").stdout)["task"] == "text-generation"
    r = edgellm(home, "pull", str(minilm_int8), "--name", "minilm")
    assert r.returncode == 2 and "--force" in r.stderr  # pulled twice: says how to replace it
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "note.txt").write_text("The warehouse in Lyon opens at seven in the morning.")
    store = str(tmp_path / "store.db")
    r = edgellm(home, "ingest", "--store", store, "--embedding-model", "minilm", str(docs))
    assert r.returncode == 0 and "1 chunk" in r.stdout, r.stderr
    r = edgellm(home, "search", "--store", store, "--json", "when does the warehouse open",
                EDGELLM_EMBEDDING__PATH="minilm")  # [embedding] path = "minilm"
    assert r.returncode == 0 and "Lyon" in json.loads(r.stdout)[0]["text"], r.stderr
    r = edgellm(home, "serve", "--model", "no-such-model", EDGELLM_MQTT__PORT=str(free_port()))
    assert r.returncode == 2 and "no-such-model" in r.stderr and "edgellm pull no-such-model" in r.stderr
