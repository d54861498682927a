"""The invoice-extraction loop, end to end, and the quantization study: which build keeps the tuned behaviour.

1. seeded invoices: a training set and a held-out test set (different seeds; no text in both);
2. a LoRA on SmolLM2-135M (`--modules`, `--epochs`), merged;
3. builds of the merged model: fp32, int8, int4 (block 32 symmetric), int4 asymmetric, int4 block 16, and
   int4 with the adapted projections kept at 8 bits;
4. each build, and the untuned int4 base, evaluated on the held-out set with the schema enforced.

    .venv/bin/python scripts/study_invoices.py --work .cache/study [--modules q_proj,v_proj] [--epochs 1]

Prints one JSON line: field accuracy and valid-JSON rate per build, and writes report.json and plot.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgellm.models.build import BuildOptions, build_model  # noqa: E402
from edgellm.models.evaluate import evaluate_model, load_examples, plot  # noqa: E402
from edgellm.models.invoices import SCHEMA, generate, write_jsonl  # noqa: E402
from edgellm.models.lora import LoraOptions, merge_lora, train_lora  # noqa: E402
from edgellm.models.quantize import QuantSpec  # noqa: E402


def variants(modules: list[str]) -> dict[str, QuantSpec]:
    return {
        "fp32": QuantSpec("fp32"),
        "int8": QuantSpec("int8"),
        "int4": QuantSpec("int4"),
        "int4-asym": QuantSpec("int4", symmetric=False),
        "int4-block16": QuantSpec("int4", block_size=16),
        "int4-8bit-adapted": QuantSpec("int4", eight_bit=tuple(modules)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / ".cache/study")
    p.add_argument("--train", type=int, default=120)
    p.add_argument("--test", type=int, default=30)
    p.add_argument("--modules", default="q_proj,v_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--only", help="comma-separated builds to run (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    modules = args.modules.split(",")
    tag = f"{'-'.join(m.removesuffix('_proj') for m in modules)}-r{args.rank}-e{args.epochs:g}-n{args.train}"
    train, test = work / f"train-{args.train}.jsonl", work / f"test-{args.test}.jsonl"
    if not train.exists():
        write_jsonl(generate(args.train, seed=1), train)
        write_jsonl(generate(args.test, seed=999), test)
    adapter, merged = work / f"adapter-{tag}", work / f"merged-{tag}"
    timings = {}
    if not (adapter / "adapter_config.json").exists():
        t = time.perf_counter()
        r = train_lora("smollm2", train, adapter, LoraOptions(rank=args.rank, alpha=2 * args.rank,
                                                               epochs=args.epochs, learning_rate=args.learning_rate,
                                                               target_modules=modules))
        timings["train_s"] = round(time.perf_counter() - t, 1)
        print(f"trained {r.steps} steps, loss {r.first_loss} -> {r.last_loss}", file=sys.stderr)
    if not (merged / "config.json").exists():
        merge_lora("smollm2", adapter, merged)
    examples = load_examples(test)
    reports = {}
    base = work / "base-int4"
    if not (base / "manifest.json").exists():
        build_model("smollm2", base, BuildOptions(QuantSpec("int4")))
    reports["base-int4"] = evaluate_model(base, examples, SCHEMA, args.threads, 200)
    only = args.only.split(",") if args.only else None
    for name, spec in variants(modules).items():
        if only and name not in only:
            continue
        out = work / f"tuned-{tag}-{name}"
        if not (out / "manifest.json").exists():
            build_model(str(merged), out, BuildOptions(spec, name=f"tuned-{name}"))
        reports[name] = evaluate_model(out, examples, SCHEMA, args.threads, 200)
        print(f"{name}: field accuracy {reports[name]['field_accuracy']:.1%}, valid JSON "
              f"{reports[name]['json_valid_rate']:.1%}", file=sys.stderr)
    (work / f"report-{tag}.json").write_text(json.dumps(reports, indent=2, ensure_ascii=False) + "\n")
    plot(list(reports.values()), work / f"plot-{tag}.png")
    summary = {"lora": tag, **timings, **{f"{k}_field_accuracy": r["field_accuracy"] for k, r in reports.items()},
               **{f"{k}_json_valid": r["json_valid_rate"] for k, r in reports.items()},
               "per_language_best": max(reports.values(), key=lambda r: r["field_accuracy"])["per_language"]}
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
