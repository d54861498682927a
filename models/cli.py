"""Host-side commands, registered into the `edgellm` CLI through the edgellm.commands entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon.errors import CommandError

QUANT_SCHEMES = ("int4", "int8", "fp32")


def cmd_model_build(args: argparse.Namespace) -> None:
    from models.quantize import QuantSpec

    args.quant = args.quant or ("int8" if args.task == "embedding" else "int4")
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise CommandError("--block-size: must be a power of two, 16 or more (e.g. 32)")
    try:
        from models.build import BuildOptions, build_model
    except ImportError as e:
        raise CommandError(f"model build needs the host extra ({e.name} is missing): "
                           "run scripts/setup.sh host, or pip install 'edgellm[host]'") from None
    options = BuildOptions(QuantSpec(args.quant, block_size=args.block_size, symmetric=not args.asymmetric),
                           name=args.name, revision=args.revision, force=args.force)
    if args.task == "embedding":
        from models.embedding_build import build_embedding

        m = build_embedding(args.source, args.out, options)
        print(f"built {m.name} (embedding, {m.embedding.dimension}-d, {m.quantization.scheme}) at {args.out}: "
              f"cosine to the source {m.quality.cosine_mean:.4f} mean, {m.quality.cosine_min:.4f} min")
        return
    manifest = build_model(args.source, args.out, options)
    q = manifest.quality
    size = sum(f.size for f in manifest.files.values())
    print(f"built {manifest.name} ({manifest.architecture}, {manifest.quantization.scheme}) at {args.out}: "
          f"{size / 1e6:.0f} MB, perplexity {q.perplexity:.2f} (source {q.source_perplexity:.2f}) "
          f"on {q.eval_tokens} tokens")


def cmd_data_invoices(args: argparse.Namespace) -> None:
    import json

    from models.invoices import LANGUAGES, SCHEMA, generate, write_jsonl

    langs = tuple(args.languages.split(",")) if args.languages else LANGUAGES
    unknown = set(langs) - set(LANGUAGES)
    if unknown or args.n < 1:
        raise CommandError(f"--languages: choose from {','.join(LANGUAGES)}" if unknown else "--n: at least 1")
    write_jsonl(generate(args.n, args.seed, langs), args.out)
    if args.schema_out:
        args.schema_out.write_text(json.dumps(SCHEMA, indent=2) + "\n")
    print(f"wrote {args.n} invoices ({', '.join(langs)}, seed {args.seed}) to {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from models.evaluate import evaluate_model, load_examples, plot
    from models.invoices import SCHEMA

    try:
        examples = load_examples(args.data)
        schema = json.loads(args.schema.read_text()) if args.schema else SCHEMA
    except (OSError, ValueError) as e:
        raise CommandError(f"--data/--schema: {e}") from None
    reports = [evaluate_model(m, examples, schema, args.threads, args.max_tokens) for m in args.model]
    out = reports[0] if len(reports) == 1 else {"models": reports}
    if args.report:
        args.report.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if args.plot:
        plot(reports, args.plot)
    for r in reports:
        langs = ", ".join(f"{k} {v['field_accuracy']:.1%}" for k, v in r["per_language"].items())
        print(f"{r['model']}: field accuracy {r['field_accuracy']:.1%} ({langs}); valid JSON "
              f"{r['json_valid_rate']:.1%}; median latency {r['latency_ms_p50']} ms on {r['n']} invoices")


def register(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="build and inspect models (host side)")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = sub.add_parser("build", help="export and quantize a model into a folder a device can load")
    p.add_argument("source", help="a Hugging Face model folder, a .gguf file, a hub id, or a built-in: "
                   "'smollm2' (SmolLM2-135M-Instruct), 'minilm' (all-MiniLM-L6-v2, for --task embedding)")
    p.add_argument("--out", required=True, type=Path, help="the model folder to create")
    p.add_argument("--task", choices=("text-generation", "embedding"), default="text-generation")
    p.add_argument("--quant", choices=QUANT_SCHEMES, help="default: int4 (text generation), int8 (embedding)")
    p.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="quantize with zero points")
    p.add_argument("--name", help="model name for the manifest (default: from the source)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_model_build)

    data = commands.add_parser("data", help="make synthetic training and test data (host side)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="KIND")
    p = sub.add_parser("invoices", help="invoices in English, Spanish and French with their gold JSON (JSONL)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--languages", help="comma-separated subset of en,es,fr")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--schema-out", type=Path, help="also write the invoice JSON Schema here")
    p.set_defaults(func=cmd_data_invoices)

    p = commands.add_parser("eval", help="field accuracy of JSON extraction, per language and field")
    p.add_argument("--model", type=Path, action="append", required=True, help="model folder (repeat to compare)")
    p.add_argument("--data", type=Path, required=True, help="JSONL with text, gold and optionally lang")
    p.add_argument("--schema", type=Path, help="JSON Schema (default: the invoice schema)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--plot", type=Path, help="write a PNG comparing the models here")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=200)
    p.set_defaults(func=cmd_eval)
