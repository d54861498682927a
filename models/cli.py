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
