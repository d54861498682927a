"""The command line, as a user runs it, on the real SmolLM2 int4 build."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import EDGELLM


def edgellm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELLM, *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.mark.slow
def test_generate_streams_an_answer(smollm2_int4):
    r = edgellm("generate", "--model", str(smollm2_int4), "--temperature", "0", "--max-tokens", "40",
                "--verbose", "What is the capital city of France? Answer in one word.")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "decode" in r.stderr and "tok/s" in r.stderr
    copy = "Repeat exactly: Acme Tools GmbH, Hauptstrasse 12, 10115 Berlin, invoice INV-2024-0042."
    r = edgellm("generate", "--model", str(smollm2_int4), "--temperature", "0", "--max-tokens", "30",
                "--speculative", "4", "--verbose", copy)
    assert r.returncode == 0 and "kept" in r.stderr, r.stderr  # [... drafts 21/30 kept]


@pytest.mark.slow
def test_generate_with_a_json_schema_file(smollm2_int4, tmp_path):
    schema = {"type": "object", "properties": {"total": {"type": "number"},
                                               "currency": {"enum": ["EUR", "USD"]}},
              "required": ["total", "currency"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = edgellm("generate", "--model", str(smollm2_int4), "--temperature", "0", "--json",
                "--json-schema", str(tmp_path / "s.json"), "Extract: total due 99.50 EUR")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["json"]["currency"] in ("EUR", "USD") and isinstance(out["json"]["total"], (int, float))
    assert out["finish_reason"] == "stop" and out["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_json_output_is_valid_json_or_nothing(smollm2_int4, tmp_path):
    """Out of tokens mid-object: stdout stays empty (no prefix to parse), the error goes to stderr."""
    schema = {"type": "object", "properties": {"vendor": {"type": "string"}, "note": {"type": "string"}},
              "required": ["vendor", "note"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    args = ["generate", "--model", str(smollm2_int4), "--temperature", "0", "--json-schema", str(tmp_path / "s.json")]
    r = edgellm(*args, "--max-tokens", "6", "Invoice from ACME Tools Ltd, thanks for your order")
    assert r.returncode != 0 and r.stdout == "" and r.stderr.strip()
    r = edgellm(*args, "--max-tokens", "120", "Invoice from ACME Tools Ltd, thanks for your order")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"vendor", "note"}


def test_every_flag_has_help_and_local_commands_have_no_broker_flags():
    import argparse

    from edgellm.daemon.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction):
                yield " ".join(path), action

    actions = list(walk(build_parser(), ["edgellm"]))
    assert [(c, a.option_strings or a.dest) for c, a in actions if not a.help] == []
    local = {c: [o for _, a in actions if _ == c for o in a.option_strings] for c in ("edgellm search", "edgellm ask",
                                                                                    "edgellm ingest")}
    assert all("--mqtt-host" not in flags for flags in local.values()), local


@pytest.mark.slow
def test_chat_keeps_history(smollm2_int4):
    r = edgellm("chat", "--model", str(smollm2_int4), "--temperature", "0", "--max-tokens", "30",
                stdin="The secret word is pineapple.\nRepeat the secret word.\n/exit\n")
    assert r.returncode == 0, r.stderr
    second = [line for line in r.stdout.splitlines() if line.strip()][-1]
    assert "pineapple" in second.lower()  # only the history holds the word


@pytest.mark.slow
def test_chat_saves_and_loads_a_conversation(smollm2_int4, tmp_path):
    saved, bad = tmp_path / "talk.json", tmp_path / "bad.json"
    bad.write_text('[{"role": "robot", "content": "hi"}]')
    r = edgellm("chat", "--model", str(smollm2_int4), "--temperature", "0", "--max-tokens", "30",
                stdin=f"The secret word is pineapple.\n/save {saved}\n/reset\n/load {bad}\n/load {saved}\n"
                      "Repeat the secret word.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert [m["role"] for m in json.loads(saved.read_text())] == ["user", "assistant"]
    assert "is not a saved conversation" in r.stderr and "loaded 2 messages" in r.stderr
    second = [line for line in r.stdout.splitlines() if line.strip()][-1]
    assert "pineapple" in second.lower()  # only the loaded conversation holds the word


@pytest.mark.slow
def test_bad_flags_name_the_flag_and_exit_2(smollm2_int4, tmp_path):
    model = str(smollm2_int4)
    r = edgellm("generate", "--model", model, "--temperature", "9", "hi")
    assert r.returncode == 2 and "--temperature" in r.stderr and "less than or equal to 5" in r.stderr
    r = edgellm("generate", "--model", model, "--top-p", "0", "hi")
    assert r.returncode == 2 and "--top-p" in r.stderr
    r = edgellm("generate", "--model", model, "")
    assert r.returncode == 2 and "prompt: is empty" in r.stderr
    r = edgellm("generate", "--model", model, "--speculative", "sometimes", "hi")
    assert r.returncode == 2 and "--speculative: Value error, must be 'auto', 'off' or a draft length" in r.stderr
    (tmp_path / "bad.json").write_text("{nope")
    r = edgellm("generate", "--model", model, "--json-schema", str(tmp_path / "bad.json"), "hi")
    assert r.returncode == 2 and "--json-schema" in r.stderr
    r = edgellm("generate", "--model", str(tmp_path), "hi")
    assert r.returncode == 1 and "manifest.json is missing" in r.stderr


def test_host_commands_without_the_host_extra_say_what_to_install(tmp_path):
    import subprocess

    code = ("import sys\nsys.modules['peft'] = None  # as on a device: the host extra is not installed\n"
            "from edgellm.daemon.cli import main\n"
            f"sys.exit(main(['lora', 'merge', '--base', 'smollm2', '--adapter', '{tmp_path}', '--out', "
            f"'{tmp_path / 'm'}']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "edgellm[host]" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_bash_completion_completes_commands_and_flags(tmp_path):
    script = edgellm("completion", "bash")
    assert script.returncode == 0, script.stderr
    (tmp_path / "edgellm.bash").write_text(script.stdout)
    probe = ('source "$1"; f=$(complete -p edgellm | sed -E "s/.*-F ([^ ]+).*/\\1/"); '
             'COMP_WORDS=(edgellm ing); COMP_CWORD=1; $f; echo "${COMPREPLY[@]}"; '
             'COMP_WORDS=(edgellm model build x --qu); COMP_CWORD=4; $f; echo "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe, "-", str(tmp_path / "edgellm.bash")], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.split("\n")[:2] == ["ingest", "--quant"], out
    assert edgellm("completion", "zsh").stdout.startswith("#compdef edgellm")
