"""The KV cache's type: SmolLM2-135M int4 built from the same GGUF with float16 and with float32 keys and
values, serving as the daemon does (4 rows of 512 tokens, a 256 MB prefix cache, 40 distinct ~250-token
requests four at a time), then one stream alone. Each build runs in a fresh process, the two take turns
(--repeats), and the ratios are medians of ratios between back-to-back runs.

    .venv/bin/python scripts/bench_kv.py [--repeats 3]

Ends with one JSON line: `rss_ratio` and `kv_pool_ratio` (float16 over float32), `decode_ratio`, and
`ppl_ratio` (the manifests' perplexities on models/data/eval_en.txt).
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

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "scripts" / "bench_workers.py"
console = Console(stderr=True)


def worker(*args: str) -> dict:
    r = subprocess.run([sys.executable, str(WORKERS), *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = ROOT / ".cache" / "bench"
    builds = {kv: cached_build(work / f"smollm2-kv-{kv}", "smollm2", "--kv-cache", kv) for kv in ("float16", "float32")}
    runs: dict[str, list[dict]] = {kv: [] for kv in builds}
    for r in range(args.repeats):
        console.log(f"round {r + 1} of {args.repeats}")
        for kv, folder in builds.items():
            runs[kv].append(worker("serving-memory", "--model", str(folder), "--threads", "2",
                                   "--prompt-file", str(ROOT / "models/data/eval_en.txt")))
    ppl = {kv: json.loads((f / "manifest.json").read_text())["quality"]["perplexity"] for kv, f in builds.items()}

    def ratio(key: str) -> float:
        return round(statistics.median(a[key] / b[key] for a, b in zip(runs["float16"], runs["float32"],
                                                                         strict=True)), 3)

    for kv, rows in runs.items():
        console.log(kv, {k: statistics.median(row[k] for row in rows) for k in rows[0]}, f"ppl {ppl[kv]}")
    last = {kv: rows[-1] for kv, rows in runs.items()}
    print(json.dumps({"rss_ratio": ratio("rss_mb"), "peak_rss_ratio": ratio("peak_rss_mb"),
                      "kv_pool_ratio": ratio("kv_pool_mb"), "prefix_cache_ratio": ratio("prefix_cache_mb"),
                      "decode_ratio": ratio("decode_tps"), "ppl_ratio": round(ppl["float16"] / ppl["float32"], 4),
                      "ppl": ppl, "float16": last["float16"], "float32": last["float32"]}))


if __name__ == "__main__":
    main()
