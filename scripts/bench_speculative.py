"""Speculative decoding from the prompt, on what edgellm is asked to do: invoice extraction (60 invoices of the
leave-family-out layouts, fields copied from the text), grounded answers (the questions of
tests/data/rag_eval.py, each over its own document, through the daemon's `answer`), and free chat (20 open
prompts), each with drafts off and auto, and llama.cpp on the same prompt ids and the same file with
llama-cpp-python's own prompt-lookup drafting (`LlamaPromptLookupDecoding`, 10 tokens) and, for extraction,
the task's JSON schema as its grammar (`LlamaGrammar.from_json_schema`).

The weights: the untuned SmolLM2-135M-Instruct Q4_1 GGUF for both engines (no tuned merge is kept here, and
converting one to GGUF needs llama.cpp's converter script, which the anchor does not install). Greedy, 2
threads, at most 96 new tokens. edgellm's two modes alternate prompt by prompt in one process; llama.cpp
runs after it in its own (the machine drifts by +-25% from minute to minute: ratios of medians over many
prompts, not one timing, are what this reports).

    .venv/bin/python scripts/bench_speculative.py [--models smollm2,gemma3]

Ends with one JSON line: `extract_latency_ratio`, `rag_latency_ratio` (median latency, auto over off),
`outputs_identical` (share of prompts whose text is the same with drafts), `extract_vs_llamacpp`,
`rag_vs_llamacpp` (decode tok/s, auto over llama.cpp with prompt lookup), `chat_ratio` (decode tok/s on chat,
auto over off), with per-task detail; for each model after the first, its keys are prefixed by its name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_models import cached_build  # scripts/, on the path when a script runs
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "scripts" / "bench_workers.py"
LLAMA_PY = ROOT / ".cache/anchors/bin/python"
console = Console(stderr=True)


def gguf_of(name: str) -> Path:
    from edgellm.models.building.sources import resolve_source

    source = resolve_source(name)
    return source.folder / source.gguf_file


def worker(python: Path, *args: str) -> dict:
    r = subprocess.run([str(python), str(WORKERS), *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key]]
    return statistics.median(values) if values else 0.0


def measure(name: str, work: Path) -> dict:
    folder = cached_build(work / f"{name}-spec", name)
    console.log(f"{name}: edgellm, drafts off and auto")
    ours = worker(Path(sys.executable), "speculative", "--model", str(folder), "--threads", "2")
    anchor_rows = {task: [{"ids": r["ids"], "tokens": r["off"]["tokens"], "schema": r.get("schema")}
                          for r in rows if "ids" in r] for task, rows in ours.items()}
    tasks_file = work / f"{name}-anchor-tasks.json"
    tasks_file.write_text(json.dumps(anchor_rows))
    console.log(f"{name}: llama.cpp with prompt lookup")
    theirs = worker(LLAMA_PY, "llamacpp-tasks", "--model", str(gguf_of(name)), "--threads", "2",
                    "--tasks-file", str(tasks_file))
    out = {}
    for task, rows in ours.items():
        off, auto = [r["off"] for r in rows], [r["auto"] for r in rows]
        kept = sum(a["accepted"] for a in auto)
        out[task] = {"prompts": len(rows),
                     "latency_ms_off": round(1000 * median(off, "seconds"), 1),
                     "latency_ms_auto": round(1000 * median(auto, "seconds"), 1),
                     "latency_ms_llamacpp": round(1000 * median(theirs[task], "seconds"), 1),
                     "decode_tps_off": round(median(off, "decode_tps"), 1),
                     "decode_tps_auto": round(median(auto, "decode_tps"), 1),
                     "decode_tps_llamacpp": round(median(theirs[task], "decode_tps"), 1),
                     "acceptance": round(kept / max(sum(a["drafted"] for a in auto), 1), 3),
                     "kept_share": round(kept / max(sum(a["tokens"] for a in auto), 1), 3),
                     "identical": round(sum(r["off"]["text"] == r["auto"]["text"] for r in rows) / len(rows), 3)}
    return out


def summarize(results: dict[str, dict]) -> dict:
    line: dict = {}
    for i, (name, r) in enumerate(results.items()):
        prefix = "" if i == 0 else f"{name}_"

        def ratio(task: str, a: str, b: str, r=r) -> float:
            return round(r[task][a] / r[task][b], 3) if r[task][b] else 0.0

        prompts = sum(t["prompts"] for t in r.values())
        line.update({
            f"{prefix}extract_latency_ratio": ratio("extract", "latency_ms_auto", "latency_ms_off"),
            f"{prefix}rag_latency_ratio": ratio("rag", "latency_ms_auto", "latency_ms_off"),
            f"{prefix}outputs_identical": round(sum(t["identical"] * t["prompts"] for t in r.values()) / prompts, 3),
            f"{prefix}extract_vs_llamacpp": ratio("extract", "decode_tps_auto", "decode_tps_llamacpp"),
            f"{prefix}rag_vs_llamacpp": ratio("rag", "decode_tps_auto", "decode_tps_llamacpp"),
            f"{prefix}chat_ratio": ratio("chat", "decode_tps_auto", "decode_tps_off")})
    return {**line, "tasks": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2")
    args = p.parse_args()
    if not LLAMA_PY.exists():
        sys.exit("the llama.cpp anchor is missing: scripts/install_bench_anchors.sh")
    work = ROOT / ".cache" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, work) for name in args.models.split(",")}
    table = Table(title="greedy, 2 threads: medians over each task's prompts")
    columns = ("latency_ms_off", "latency_ms_auto", "latency_ms_llamacpp", "decode_tps_off", "decode_tps_auto",
               "decode_tps_llamacpp", "acceptance", "identical")
    for col in ("model", "task", *columns):
        table.add_column(col)
    for m, rows in results.items():
        for t, r in rows.items():
            table.add_row(m, t, *(str(r[c]) for c in columns))
    console.print(table)
    print(json.dumps(summarize(results)))


if __name__ == "__main__":
    main()
