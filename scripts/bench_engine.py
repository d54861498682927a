"""Engine benchmark: edgellm int4/int8 against llama.cpp and onnxruntime-genai, measured in one run.

SmolLM2-135M-Instruct, 2 threads, a ~200-token prompt, 128 greedy new tokens. Every engine runs in a fresh
process (bench_workers.py) so its peak RSS is its own, and the engines take turns (--repeats), because this
shared machine's speed drifts by +-25% from minute to minute: each ratio is the median of ratios between
runs made back to back, and its range is printed too.

    .venv/bin/python scripts/bench_engine.py [--install-anchors] [--rounds 3] [--repeats 3]
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
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "scripts" / "bench_workers.py"
ANCHOR_PY = {"llamacpp": ROOT / ".cache/anchors/bin/python", "genai": ROOT / ".cache/genai/bin/python"}
PROMPT_WORDS = 160  # ~200 SmolLM2 tokens of the repo's evaluation text
console = Console(stderr=True)


def worker(python: Path, *args: str) -> dict:
    out = subprocess.run([str(python), str(WORKERS), *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def anchor_ready(name: str, module: str) -> bool:
    py = ANCHOR_PY[name]
    return py.exists() and subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_edgellm_build(work: Path, scheme: str) -> Path:
    return cached_build(work / f"smollm2-{scheme}", "smollm2", "--quant", scheme)


def save_hf_folder(work: Path) -> Path:
    """The dequantized GGUF as a plain HF folder (transformers 5 refuses to save GGUF-loaded models)."""
    out = work / "smollm2-hf"
    if not (out / "config.json").exists():
        from edgellm.models.building.export import load_source
        from edgellm.models.building.sources import resolve_source

        hf = load_source(resolve_source("smollm2"))
        hf.model.save_pretrained(out)
        hf.tokenizer.save_pretrained(out)
    return out


def weight_bytes_per_token(model: Path) -> int:
    """Bytes of weights a decode step reads: every initializer but the tables it looks rows up in (the
    embedding, 8-bit or not, and GroupQueryAttention's rotary cos/sin caches)."""
    import onnx

    graph = onnx.load(model / "model.onnx", load_external_data=False).graph
    row_tables = set()
    for node in graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized"):
            row_tables.update(node.input[i] for i in (0, 2, 3) if i < len(node.input))
        elif node.op_type == "GroupQueryAttention":
            row_tables.update(node.input[7:9])
    return sum(next((int(e.value) for e in init.external_data if e.key == "length"), len(init.raw_data))
               for init in graph.initializer if init.name not in row_tables)


def median_result(runs: list[dict]) -> dict:
    """Per-key medians of several runs of one engine (each already the median of its own rounds)."""
    shared = [k for k, v in runs[0].items() if isinstance(v, int | float) and all(k in r for r in runs[1:])]
    return {k: statistics.median(r[k] for r in runs) for k in shared}


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def plot_concurrency(curves: dict[str, dict], path: Path) -> None:
    """Aggregate tok/s against concurrent streams, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, rates in curves.items():
        ns = sorted(int(n) for n in rates)
        ax.plot(ns, [rates[str(n)] for n in ns], marker="o", label=label)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tok/s")
    ax.set_xticks([1, 2, 4, 8])
    ax.set_ylim(0, None)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M int4, 2 threads, greedy", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="decode rounds inside each engine process")
    p.add_argument("--repeats", type=int, default=3, help="turns each engine takes, interleaved with the others")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / ".cache/bench")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/concurrency.png")
    p.add_argument("--install-anchors", action="store_true", help="build llama-cpp-python (~18 min) and "
                   "onnxruntime-genai into .cache/ first")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.install_anchors:
        subprocess.run([str(ROOT / "scripts/install_bench_anchors.sh")], check=True)

    sys.path.insert(0, str(ROOT))
    from edgellm.models.building.sources import builtin_gguf

    gguf = builtin_gguf()
    words = (ROOT / "models/data/eval_en.txt").read_text().split()
    prompt_file = args.work / "prompt.txt"
    prompt_file.write_text(" ".join(words[:PROMPT_WORDS]))
    common = ["--prompt-file", str(prompt_file), "--threads", str(args.threads),
              "--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds)]

    eval_file = ROOT / "models/data/eval_en.txt"
    py = ROOT / ".venv/bin/python"
    int4, int8 = ensure_edgellm_build(args.work, "int4"), ensure_edgellm_build(args.work, "int8")
    engines = {"edgellm int4": (py, ["edgellm", "--model", str(int4)], int4)}
    if anchor_ready("llamacpp", "llama_cpp"):
        engines["llama.cpp Q4_1"] = (ANCHOR_PY["llamacpp"], ["llamacpp", "--model", str(gguf)], gguf)
    else:
        console.print("[yellow]llama.cpp anchor skipped: llama-cpp-python is not installed in .cache/anchors "
                      "(run with --install-anchors; it compiles for ~18 minutes)")
    genai_dir = args.work / "genai-int4"
    if anchor_ready("genai", "onnxruntime_genai"):
        if not (genai_dir / "genai_config.json").exists():
            worker(ANCHOR_PY["genai"], "genai-build", "--hf", str(save_hf_folder(args.work)), "--out", str(genai_dir))
        engines["onnxruntime-genai int4"] = (ANCHOR_PY["genai"], ["genai", "--model", str(genai_dir)], genai_dir)
    else:
        console.print("[yellow]onnxruntime-genai anchor skipped: not installed in .cache/genai "
                      "(run with --install-anchors)")

    # The engines take turns, --repeats times, so a slow minute on the shared machine hits each of them; every
    # ratio is the median of ratios between runs made back to back.
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        for name, (python, argv, _) in engines.items():
            ppl = ["--ppl-file", str(eval_file)] if name.startswith("llama.cpp") and repeat == 0 else []
            runs[name].append(worker(python, *argv, *common, *ppl))
            console.print(f"{name}, repeat {repeat + 1}: {json.dumps(runs[name][-1])}")
    results = {name: {**median_result(rs), "disk_mb": disk_mb(engines[name][2])} for name, rs in runs.items()}
    results["edgellm int8"] = {**worker(py, "edgellm", "--model", str(int8), *common), "disk_mb": disk_mb(int8)}
    if "llama.cpp Q4_1" in runs:
        results["llama.cpp Q4_1"]["ppl"] = runs["llama.cpp Q4_1"][0]["ppl"]

    bandwidth = worker(py, "bandwidth")["copy_gb_per_s"]
    streams = ["--threads", str(args.threads), "--new-tokens", "64"]
    concurrency = worker(py, "concurrency", "--model", str(int4), *streams)
    curves = {"edgellm int4 (continuous batching)": concurrency["aggregate_tps"]}
    console.print(f"concurrency: {json.dumps(concurrency)}; memory copy {bandwidth} GB/s")
    prefix = worker(py, "edgellm-prefix", "--model", str(int4), "--prompt-file", str(eval_file),
                    "--threads", str(args.threads), "--rounds", str(args.rounds))
    console.print(f"prefix reuse: {json.dumps(prefix)}")
    scheduler = worker(py, "scheduler", "--model", str(int4), "--prompt-file", str(eval_file),
                       "--threads", str(args.threads), "--rounds", str(args.rounds))
    console.print(f"scheduler: {json.dumps(scheduler)}")
    if "llama.cpp Q4_1" in engines:
        curves["llama.cpp Q4_1 (llama-cpp-python: one at a time)"] = worker(
            ANCHOR_PY["llamacpp"], "concurrency-llamacpp", "--model", str(gguf), *streams)["aggregate_tps"]
    if "onnxruntime-genai int4" in engines:
        curves["onnxruntime-genai int4 (static batch)"] = worker(
            ANCHOR_PY["genai"], "concurrency-genai", "--model", str(genai_dir), *streams)["aggregate_tps"]

    plot_concurrency(curves, args.plot)
    console.print(f"concurrency curves: {json.dumps(curves)}")

    table = Table(title=f"SmolLM2-135M, {args.threads} threads, {args.new_tokens} greedy tokens, "
                        f"median of {args.repeats} runs of {args.rounds} rounds")
    for col in ("engine", "prompt tok", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "disk MB"):
        table.add_column(col, justify="right" if col != "engine" else "left")
    for name, r in results.items():
        table.add_row(name, str(r["prompt_tokens"]), f"{r['ttft_ms']:.0f}", f"{r['prefill_tps']:.0f}",
                      f"{r['decode_tps']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['disk_mb']:.0f}")
    Console().print(table)

    e4 = results["edgellm int4"]
    llama = results.get("llama.cpp Q4_1")
    genai = results.get("onnxruntime-genai int4")

    manifest = json.loads((args.work / "smollm2-int4" / "manifest.json").read_text())
    ppl4 = manifest["quality"]["perplexity"]
    per_token = weight_bytes_per_token(args.work / "smollm2-int4")

    def ratio(anchor: str, key: str) -> dict:
        """edgellm int4 against `anchor`: the median and range of one ratio per repeat (runs back to back)."""
        r = sorted(round(a[key] / b[key], 3) for a, b in zip(runs["edgellm int4"], runs.get(anchor, []), strict=False))
        return {"median": statistics.median(r), "range": [r[0], r[-1]]} if r else {"median": None, "range": None}

    decode_llama, prefill_llama = ratio("llama.cpp Q4_1", "decode_tps"), ratio("llama.cpp Q4_1", "prefill_tps")
    decode_genai = ratio("onnxruntime-genai int4", "decode_tps")

    summary = {
        "edgellm_int4_decode_tps": e4["decode_tps"], "edgellm_int4_prefill_tps": e4["prefill_tps"],
        "edgellm_int4_ttft_ms": e4["ttft_ms"],
        "edgellm_int8_decode_tps": results["edgellm int8"]["decode_tps"],
        "edgellm_int8_prefill_tps": results["edgellm int8"]["prefill_tps"],
        "llamacpp_decode_tps": llama and llama["decode_tps"], "llamacpp_prefill_tps": llama and llama["prefill_tps"],
        "genai_decode_tps": genai and genai["decode_tps"], "genai_prefill_tps": genai and genai["prefill_tps"],
        "decode_ratio_vs_llamacpp": decode_llama["median"], "decode_ratio_vs_llamacpp_range": decode_llama["range"],
        "prefill_ratio_vs_llamacpp": prefill_llama["median"],
        "prefill_ratio_vs_llamacpp_range": prefill_llama["range"],
        "decode_ratio_vs_genai": decode_genai["median"], "decode_ratio_vs_genai_range": decode_genai["range"],
        "peak_rss_mb": e4["peak_rss_mb"], "edgellm_int8_peak_rss_mb": results["edgellm int8"]["peak_rss_mb"],
        "prefix_ttft_ratio": prefix["prefix_ttft_ratio"], "prefix_cached_tokens": prefix["cached_tokens"],
        "concurrency4_speedup": concurrency["concurrency4_speedup"],
        "concurrency4_speedup_range": concurrency["concurrency4_speedup_range"],
        "prefill_stall_steps": scheduler["prefill_stall_steps"],
        "prefill_stall_steps_range": scheduler["prefill_stall_steps_range"],
        "ttft_ratio_4_arriving": scheduler["ttft_ratio_4_arriving"],
        "ttft_ratio_4_arriving_distinct": scheduler["ttft_ratio_4_arriving_distinct"],
        "concurrency_aggregate_tps": curves,
        "edgellm_int4_ppl": ppl4, "llamacpp_ppl": llama and llama.get("ppl"),
        "ppl_ratio_vs_llamacpp": round(ppl4 / llama["ppl"], 3) if llama and llama.get("ppl") else None,
        "memory_copy_gb_s": bandwidth, "weight_mb_per_token": round(per_token / 1e6, 1),
        "bandwidth_limit_tps": round(bandwidth * 1e9 / per_token, 1),
        "decode_share_of_bandwidth_limit": round(e4["decode_tps"] / (bandwidth * 1e9 / per_token), 3),
    }
    for name, r in results.items():
        console.print(f"{name}: {json.dumps(r)}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
