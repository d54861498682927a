"""What `--keep-base` costs: decode and prefill speed and size of a LoRA-merged model built with the base's
blocks exact and the LoRA's change beside them, against the same merged model rounded to int4 (the README's
recipe, --asymmetric). The two builds take turns, round after round, so drift on this machine hits both alike.

    .venv/bin/python scripts/bench_keep_base.py --merged .cache/study17/merged-... [--rounds 5]

Prints one JSON line: medians per build and the ratios keep-base / merged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgellm.daemon.engine.generate import Generator  # noqa: E402
from edgellm.daemon.engine.model import LoadedModel  # noqa: E402
from edgellm.daemon.engine.params import GenerationParams  # noqa: E402
from scripts.bench_models import cached_build  # noqa: E402

PROMPT = "Extract the invoice fields as JSON.\n\n" + (ROOT / "models/data/eval_en.txt").read_text()[:1200]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merged", type=Path, required=True, help="a `lora merge` folder whose base is a GGUF")
    p.add_argument("--work", type=Path, default=ROOT / ".cache/bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    folders = {"merged": cached_build(args.work / f"{args.merged.name}-int4-asym", str(args.merged), "--asymmetric"),
               "keep_base": cached_build(args.work / f"{args.merged.name}-keep-base", str(args.merged), "--keep-base")}
    generators = {name: Generator(LoadedModel.load(folder, threads=2)) for name, folder in folders.items()}
    params = GenerationParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    decode: dict[str, list[float]] = {name: [] for name in folders}
    prefill: dict[str, list[float]] = {name: [] for name in folders}
    for _ in range(args.rounds):
        for name, generator in generators.items():
            result = generator.generate(generator.prompt_ids(prompt=PROMPT), params)
            assert result.usage.completion_tokens == args.tokens
            decode[name].append(result.timings.decode_tps)
            prefill[name].append(result.timings.prefill_tps)
    med = {name: {"decode_tok_s": round(statistics.median(decode[name]), 1),
                  "prefill_tok_s": round(statistics.median(prefill[name]), 1),
                  "mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 1e6, 1)}
           for name, folder in folders.items()}
    print(json.dumps({**med, "decode_ratio": round(med["keep_base"]["decode_tok_s"] / med["merged"]["decode_tok_s"], 3),
                      "prefill_ratio": round(med["keep_base"]["prefill_tok_s"] / med["merged"]["prefill_tok_s"], 3),
                      "size_ratio": round(med["keep_base"]["mb"] / med["merged"]["mb"], 3), "rounds": args.rounds}))


if __name__ == "__main__":
    main()
