"""The invoice-extraction loop, end to end, and the quantization study: which build keeps the tuned behaviour.

1. seeded invoices: a training set and a held-out test set (different seeds; no text in both);
2. a LoRA on SmolLM2-135M (`--modules`, `--epochs`), merged;
3. builds of the merged model: fp32, int8, int4 (block 32 symmetric), int4 asymmetric, int4 block 16,
   int4 with the adapted projections kept at 8 bits, and int4 keeping the base (`--keep-base`: the GGUF's
   blocks exact, the LoRA's change beside them in fp32; scripts/study_quantizers.py compares it with HQQ and
   GPTQ);
4. each build, and the untuned int4 base, evaluated with the schema enforced on two held-out sets: invoices
   in the layout families it trained on (`--train-families`, same-family), and invoices in families it never
   saw (`--test-families`, leave-family-out: models/tuning/invoice_layouts.py), the latter also with the vendor and
   invoice number copied from the text, the date and amounts chosen among those it writes (x-edgellm-copy).

    .venv/bin/python scripts/study_invoices.py --work .cache/study [--modules q_proj,v_proj] [--epochs 1]

Prints one JSON line: field accuracy and valid-JSON rate per build and split, the leave-family-out accuracy
of the tuned int4 build per language, field and family, the copy constraint's gain, and the int4 build's
perplexity against its fp32 source; writes report.json and plot.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgellm.models.building.build import build_model  # noqa: E402
from edgellm.models.building.options import BuildOptions  # noqa: E402
from edgellm.models.building.quantize import QuantSpec  # noqa: E402
from edgellm.models.tuning.evaluate import evaluate_model, load_examples, plot  # noqa: E402
from edgellm.models.tuning.invoices import COPY_SCHEMA, SCHEMA, generate, write_jsonl  # noqa: E402
from edgellm.models.tuning.lora import LoraOptions, merge_lora, train_lora  # noqa: E402


def variants(modules: list[str]) -> dict[str, BuildOptions]:
    return {name: BuildOptions(spec, name=f"tuned-{name}", keep_base=name == "int4-keep-base") for name, spec in {
        "fp32": QuantSpec("fp32"),
        "int8": QuantSpec("int8"),
        "int4": QuantSpec("int4"),
        "int4-asym": QuantSpec("int4", symmetric=False),
        "int4-block16": QuantSpec("int4", block_size=16),
        "int4-8bit-adapted": QuantSpec("int4", eight_bit=tuple(modules)),
        "int4-keep-base": QuantSpec("int4"),  # the base's blocks exact, the LoRA's change beside them in fp32
    }.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / ".cache/study")
    p.add_argument("--train", type=int, default=120)
    p.add_argument("--test", type=int, default=30)
    p.add_argument("--lfo-test", type=int, default=60, help="leave-family-out test invoices")
    p.add_argument("--train-families", default="classic")
    p.add_argument("--test-families", default="letterhead,form,receipt,email")
    p.add_argument("--modules", default="q_proj,v_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed (LoRA init, batch order); same data")
    p.add_argument("--number-pattern", help='a JSON Schema "pattern" the copied invoice number must also match '
                   '(e.g. "\\d": it has a digit; daemon/engine/constrain/copy_grammar.py); scored again, not retrained')
    p.add_argument("--only", help="comma-separated builds to run (default: all)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    modules = args.modules.split(",")
    trained_on, held_out = tuple(args.train_families.split(",")), tuple(args.test_families.split(","))
    if set(trained_on) & set(held_out):
        sys.exit("--train-families and --test-families must not share a family")
    families = "-".join(trained_on)
    tag = (f"{'-'.join(m.removesuffix('_proj') for m in modules)}-r{args.rank}-e{args.epochs:g}-n{args.train}"
           + ("" if trained_on == ("classic",) else f"-{families}") + (f"-s{args.seed}" if args.seed else ""))
    train, test = work / f"train-{args.train}-{families}.jsonl", work / f"test-{args.test}-{families}.jsonl"
    lfo = work / f"lfo-{args.lfo_test}-{'-'.join(held_out)}.jsonl"
    copy_schema = COPY_SCHEMA
    if args.number_pattern:
        number = {**COPY_SCHEMA["properties"]["invoice_number"], "pattern": args.number_pattern}
        copy_schema = {**COPY_SCHEMA, "properties": {**COPY_SCHEMA["properties"], "invoice_number": number}}
    # the base's saved scores hold for these test files and these schemas only
    schemas = hashlib.sha256(json.dumps([SCHEMA, copy_schema], sort_keys=True).encode()).hexdigest()[:8]
    base, base_reports = work / "base-int4", work / f"report-base-int4-{test.stem}-{lfo.stem}-{schemas}.json"
    if not train.exists():
        write_jsonl(generate(args.train, seed=1, families=trained_on), train)
        write_jsonl(generate(args.test, seed=999, families=trained_on), test)
        base_reports.unlink(missing_ok=True)  # the untuned base's scores on earlier test files
    if not lfo.exists():
        write_jsonl(generate(args.lfo_test, seed=998, families=held_out), lfo)
        base_reports.unlink(missing_ok=True)
    adapter, merged = work / f"adapter-{tag}", work / f"merged-{tag}"
    timings = {}
    if not (adapter / "adapter_config.json").exists():
        t = time.perf_counter()
        r = train_lora("smollm2", train, adapter, LoraOptions(rank=args.rank, alpha=2 * args.rank,
                                                               epochs=args.epochs, learning_rate=args.learning_rate,
                                                               target_modules=modules, seed=args.seed))
        timings["train_s"] = round(time.perf_counter() - t, 1)
        print(f"trained {r.steps} steps, loss {r.first_loss} -> {r.last_loss}", file=sys.stderr)
    if not (merged / "config.json").exists():
        merge_lora("smollm2", adapter, merged)
    splits = {"same_family": load_examples(test), "leave_family_out": load_examples(lfo)}
    reports: dict[str, dict] = {}

    def evaluate(name: str, folder: Path, saved: Path | None = None) -> None:
        if saved and saved.exists():  # the untuned base scores the same on the same test files
            reports.update(json.loads(saved.read_text()))
            return
        for split, examples in splits.items():
            reports[f"{name} {split}"] = evaluate_model(folder, examples, SCHEMA, args.threads, 200)
        reports[f"{name} leave_family_out copy"] = evaluate_model(folder, splits["leave_family_out"], copy_schema,
                                                                 args.threads, 200)
        for key in (f"{name} same_family", f"{name} leave_family_out", f"{name} leave_family_out copy"):
            r = reports[key]
            print(f"{key}: field accuracy {r['field_accuracy']:.1%}, valid JSON {r['json_valid_rate']:.1%}",
                  file=sys.stderr)
        if saved:
            saved.write_text(json.dumps({k: v for k, v in reports.items() if k.startswith(f"{name} ")}) + "\n")

    if not (base / "manifest.json").exists():
        build_model("smollm2", base, BuildOptions(QuantSpec("int4")))
        base_reports.unlink(missing_ok=True)  # scores of an earlier build
    evaluate("base-int4", base, base_reports)
    only = args.only.split(",") if args.only else None
    perplexity = {}
    for name, options in variants(modules).items():
        if only and name not in only:
            continue
        out = work / f"tuned-{tag}-{name}"
        if not (out / "manifest.json").exists():
            build_model(str(merged), out, options)
        quality = json.loads((out / "manifest.json").read_text())["quality"]
        perplexity[name] = {"built": quality["perplexity"], "source": quality.get("source_perplexity")}
        evaluate(name, out)
    if args.number_pattern:  # the same model scored again: its reports sit beside the first ones
        tag += f"-pattern-{schemas}"
    (work / f"report-{tag}.json").write_text(json.dumps(reports, indent=2, ensure_ascii=False) + "\n")
    plot([dict(r, model=k) for k, r in reports.items()], work / f"plot-{tag}.png")
    summary = {"lora": tag, **({"number_pattern": args.number_pattern} if args.number_pattern else {}),
               "train_families": list(trained_on), "test_families": list(held_out), **timings,
               **{f"{k} field_accuracy": r["field_accuracy"] for k, r in reports.items()},
               **{f"{k} json_valid": r["json_valid_rate"] for k, r in reports.items()}}
    tuned = next((n for n in ("int4-keep-base", "int4") if f"{n} leave_family_out" in reports),
                 next(iter(perplexity), None))
    if tuned is not None:
        lfo_report = reports[f"{tuned} leave_family_out"]
        summary.update({
            "leave_family_out_field_accuracy": lfo_report["field_accuracy"],
            "leave_family_out_with_copy_field_accuracy": reports[f"{tuned} leave_family_out copy"]["field_accuracy"],
            "same_family_field_accuracy": reports[f"{tuned} same_family"]["field_accuracy"],
            "per_language": lfo_report["per_language"], "per_field": lfo_report["per_field"],
            "per_family": lfo_report["per_family"],
            "with_copy": {k: reports[f"{tuned} leave_family_out copy"][k] for k in ("per_language", "per_field",
                                                                                   "per_family")},
            "json_valid_rate": min(r["json_valid_rate"] for k, r in reports.items() if k.startswith(f"{tuned} ")),
            "copy_constraint_gain": round(reports[f"{tuned} leave_family_out copy"]["field_accuracy"]
                                          - lfo_report["field_accuracy"], 4),
            "base_copy_constraint_gain": round(reports["base-int4 leave_family_out copy"]["field_accuracy"]
                                               - reports["base-int4 leave_family_out"]["field_accuracy"], 4)})
        p = perplexity[tuned]
        if p["source"]:
            summary["int4_ppl_ratio_vs_fp32"] = round(p["built"] / p["source"], 4)
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
