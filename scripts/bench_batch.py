"""Dask batch benchmark: `batch eval` of SmolLM2 int4 on held-out invoices with 1 worker and with 2 workers
(one process and one onnxruntime thread each), on LocalClusters started in the same run.

    .venv/bin/python scripts/bench_batch.py [--n 24]

The anchor is 1 worker; the speed-up is (time with 1 worker) / (time with 2 workers), model loading included
(each worker loads the model once). For reference it also times 1 worker with 2 onnxruntime threads, which is
what one process on this 2-core machine would do without Dask.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_models import cached_build  # noqa: E402  (scripts/, on the path when a script runs)

from edgellm.models.tuning.batch import batch_eval, cluster  # noqa: E402
from edgellm.models.tuning.invoices import SCHEMA, generate  # noqa: E402


def timed(model: Path, examples: list[dict], workers: int, threads: int) -> tuple[float, dict]:
    start = time.perf_counter()
    with cluster(None, workers) as client:
        report = batch_eval(client, model, examples, SCHEMA, max_tokens=120, batch_size=2, threads=threads)
    return time.perf_counter() - start, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--model", type=Path, default=ROOT / ".cache/bench/smollm2-int4")
    args = p.parse_args()
    cached_build(args.model, "smollm2", "--quant", "int4")
    examples = [{"lang": i.lang, "text": i.text, "gold": i.gold} for i in generate(args.n, 4242)]
    one, r1 = timed(args.model, examples, 1, 1)
    two, r2 = timed(args.model, examples, 2, 1)
    one_two_threads, _ = timed(args.model, examples, 1, 2)
    assert r1["per_field"] == r2["per_field"], "the workers disagree: evaluation is greedy and must match"
    summary = {"invoices": args.n, "one_worker_s": round(one, 1), "two_workers_s": round(two, 1),
               "speedup_2_workers": round(one / two, 2), "one_worker_two_threads_s": round(one_two_threads, 1),
               "speedup_vs_one_worker_two_threads": round(one_two_threads / two, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
