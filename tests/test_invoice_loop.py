"""The customisation loop end to end on a tiny Llama, through the real CLI: data, LoRA, merge, int4 build,
evaluation of base against tuned with constrained JSON, and a signed bundle that records the evaluation."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.harness import EDGELLM, ROOT

pytestmark = pytest.mark.slow  # see the README's development section


def run(*args) -> subprocess.CompletedProcess:
    out = subprocess.run([*EDGELLM, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out


def edgellm(*args) -> str:
    return run(*args).stdout


def assert_piped_progress(stderr: str) -> None:
    """Piped (as here), progress is whole lines: no bar redrawn with \r, no library's WARNING:root: line."""
    assert "\r" not in stderr and "WARNING:root:" not in stderr and "it/s]" not in stderr, stderr[-2000:]


def test_tiny_loop(tiny_sources, tmp_path):
    base_src = tiny_sources["llama"]
    edgellm("data", "invoices", "--n", 24, "--seed", 1, "--out", tmp_path / "train.jsonl",
            "--schema-out", tmp_path / "schema.json")
    edgellm("data", "invoices", "--n", 3, "--seed", 2, "--out", tmp_path / "test.jsonl")
    training = run("lora", "train", "--base", base_src, "--data", tmp_path / "train.jsonl", "--out",
                   tmp_path / "adapter", "--epochs", 2, "--learning-rate", 0.01)
    trained = training.stdout
    assert_piped_progress(training.stderr)
    assert "LoRA step: 12/12, loss " in training.stderr and "s left" in training.stderr, training.stderr  # 24/4 x 2
    first, last = (float(x) for x in trained.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first, trained
    edgellm("lora", "merge", "--base", base_src, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    edgellm("model", "build", base_src, "--out", tmp_path / "base-int4", "--name", "base")
    built = run("model", "build", tmp_path / "merged", "--out", tmp_path / "tuned-int4", "--name", "tuned")
    assert_piped_progress(built.stderr)
    assert "[1/" in built.stderr and "done in" in built.stderr, built.stderr  # a line per stage
    evaluated = subprocess.run([*EDGELLM, "eval", "--model", tmp_path / "base-int4", "--model", tmp_path / "tuned-int4",
                                "--data", tmp_path / "test.jsonl", "--schema", tmp_path / "schema.json",
                                "--max-tokens", "40", "--report", tmp_path / "report.json", "--plot",
                                tmp_path / "report.png"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Evaluating tuned" in evaluated.stderr and "3/3" in evaluated.stderr  # progress, on stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [m["model"] for m in report["models"]] == ["base", "tuned"]
    assert all(0 <= m["field_accuracy"] <= 1 and m["n"] == 3 for m in report["models"])
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    edgellm("keygen", "--out", tmp_path / "k")
    edgellm("bundle", "build", tmp_path / "tuned-int4", "--store", tmp_path / "store", "--key", tmp_path / "k",
            "--eval-report", tmp_path / "report.json")
    bundle = json.loads((tmp_path / "store/bundles/tuned/1/bundle.json").read_text())
    assert bundle["lineage"]["evaluation"] == report
    assert bundle["lineage"]["base_model"] == str(base_src)
