"""What a run-time adapter costs and saves: SmolLM2-135M int4 (from its GGUF) with a q/v LoRA (r=8, the
adapter of scripts/bench_update.py), merged and rounded to int4 (the default), against the GGUF base built
with q/v adapter slots and the adapter beside it (`--adapter-slots q_proj,v_proj --adapter invoices=DIR`).

- Decode and prefill speed, greedy, 2 threads, the builds taking turns round after round: the merged build,
  the slots build with the adapter, the slots build without one (the base through zero factors), the plain
  base. Ratios against the merged build.
- Update size: the slots build bundled twice, once per adapter (the second a retrained adapter: every value
  new), and the bytes a device holding the first fetches for the second (missing chunks, as deltas where
  smaller, plus the signed manifest), as a share of the bundle.

    .venv/bin/python scripts/bench_adapters.py [--rounds 5]   # builds cached in .cache/bench

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgellm.daemon.engine.generate import Generator  # noqa: E402
from edgellm.daemon.engine.model import LoadedModel  # noqa: E402
from edgellm.daemon.engine.params import GenerationParams  # noqa: E402
from scripts.bench_models import cached_build  # noqa: E402
from scripts.bench_update import models  # noqa: E402

PROMPT = "Extract the invoice fields as JSON.\n\n" + (ROOT / "models/data/eval_en.txt").read_text()[:1200]


def retrained(adapter: Path, out: Path) -> Path:
    """The adapter with every value changed, as a second training run would leave it (same shapes)."""
    from safetensors.numpy import load_file, save_file

    if not (out / "adapter_model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(adapter / "adapter_config.json", out / "adapter_config.json")
        rng = np.random.default_rng(1)
        tensors = {k: (v * (1 + 0.1 * rng.standard_normal(v.shape))).astype(v.dtype)
                   for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def update_bytes(work: Path, first: Path, second: Path) -> tuple[int, int, int]:
    """(bundle bytes, bytes fetched for the second by a device holding the first, adapter file bytes)."""
    from edgellm.models.fleet.bundles import BundleOptions, build_bundle, keygen

    store = work / "adapter-store"
    shutil.rmtree(store, ignore_errors=True)
    key = work / "adapter-bench.key"
    if not key.exists():
        keygen(key)
    v1 = build_bundle(first, store, key, BundleOptions(name="slots", version="1"))
    v2 = build_bundle(second, store, key, BundleOptions(name="slots", version="2", parent="1"))
    held, deltas = v1.unique_chunks(), v2.deltas()
    fetched = sum(deltas[sha].size if sha in deltas else size for sha, size in v2.unique_chunks().items()
                  if sha not in held)
    fetched += sum((store / f"bundles/slots/2/{f}").stat().st_size for f in ("bundle.json", "bundle.json.sig"))
    adapter = sum(f.size for f in v2.files if f.path.startswith("adapters/"))
    return v2.total_bytes, fetched, adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache/bench")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    base, merged, _ = models(args.cache, 32)
    adapter = args.cache / "lora-qv"
    second = retrained(adapter, args.cache / "lora-qv-retrained")
    slots = cached_build(args.cache / "smollm2-slots-qv", "smollm2", "--adapter-slots", "q_proj,v_proj",
                         "--adapter", f"invoices={adapter}")
    slots2 = cached_build(args.cache / "smollm2-slots-qv-retrained", "smollm2", "--adapter-slots", "q_proj,v_proj",
                          "--adapter", f"invoices={second}")
    bundle, fetched, adapter_bytes = update_bytes(args.cache, slots, slots2)

    slots_model = LoadedModel.load(slots, threads=2)
    runs = {"merged": (Generator(LoadedModel.load(merged, threads=2)), None),
            "adapter": (Generator(slots_model), "invoices"),
            "slots_no_adapter": (Generator(slots_model), None),
            "base": (Generator(LoadedModel.load(base, threads=2)), None)}
    decode: dict[str, list[float]] = {n: [] for n in runs}
    prefill: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(args.rounds):
        for name, (generator, adapter_name) in runs.items():
            params = GenerationParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, adapter=adapter_name)
            result = generator.generate(generator.prompt_ids(prompt=PROMPT), params)
            decode[name].append(result.timings.decode_tps)
            prefill[name].append(result.timings.prefill_tps)
    med = {n: {"decode_tok_s": round(statistics.median(decode[n]), 1),
               "prefill_tok_s": round(statistics.median(prefill[n]), 1)} for n in runs}
    print(json.dumps({
        **med,
        "adapter_decode_ratio_vs_merged": round(med["adapter"]["decode_tok_s"] / med["merged"]["decode_tok_s"], 3),
        "adapter_prefill_ratio_vs_merged": round(med["adapter"]["prefill_tok_s"] / med["merged"]["prefill_tok_s"],
                                                 3),
        "slots_no_adapter_decode_ratio_vs_base": round(med["slots_no_adapter"]["decode_tok_s"]
                                                       / med["base"]["decode_tok_s"], 3),
        "bundle_bytes": bundle, "adapter_file_bytes": adapter_bytes, "adapter_update_bytes": fetched,
        "adapter_update_ratio": round(fetched / bundle, 4), "rounds": args.rounds}))


if __name__ == "__main__":
    main()
