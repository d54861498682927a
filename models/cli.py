"""Host-side commands, registered into the `edgellm` CLI through the edgellm.commands entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon.errors import CommandError

QUANT_SCHEMES = ("int4", "int8", "fp32")


def cmd_model_build(args: argparse.Namespace) -> None:
    from models.quantize import QuantSpec

    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise CommandError("--block-size: must be a power of two, 16 or more (e.g. 32)")
    try:
        from models.build import BuildOptions, build_model
    except ImportError as e:
        raise CommandError(f"model build needs the host extra ({e.name} is missing): "
                           "run scripts/setup.sh host, or pip install 'edgellm[host]'") from None
    spec = QuantSpec(args.quant, block_size=args.block_size, symmetric=not args.asymmetric)
    manifest = build_model(args.source, args.out, BuildOptions(spec, name=args.name, revision=args.revision,
                                                               force=args.force))
    q = manifest.quality
    size = sum(f.size for f in manifest.files.values())
    print(f"built {manifest.name} ({manifest.architecture}, {manifest.quantization.scheme}) at {args.out}: "
          f"{size / 1e6:.0f} MB, perplexity {q.perplexity:.2f} (source {q.source_perplexity:.2f}) "
          f"on {q.eval_tokens} tokens")


def register(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="build and inspect models (host side)")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = sub.add_parser("build", help="export and quantize a model into a folder a device can load")
    p.add_argument("source", help="a Hugging Face model folder, a .gguf file, a hub id, or 'smollm2' (built in)")
    p.add_argument("--out", required=True, type=Path, help="the model folder to create")
    p.add_argument("--quant", choices=QUANT_SCHEMES, default="int4")
    p.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="quantize with zero points")
    p.add_argument("--name", help="model name for the manifest (default: from the source)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_model_build)
