"""Which 4-bit build keeps a LoRA's tuning: onnxruntime's quantizers against keeping the base (--keep-base).

A LoRA merged into SmolLM2's Q4_1 base changes each weight by less than a 4-bit step, so rounding the merged
weights again decides how much of the tuning survives. This study takes one merged model (from
scripts/study_invoices.py) and builds it five ways:
- fp32: the fused graph, unquantized (the reference);
- rtn, hqq, gptq: that graph's MatMuls through onnxruntime's MatMulNBitsQuantizer at 4 bits, block 32,
  asymmetric (the head at 8 bits, the embedding fp32): round to nearest, HQQ (no calibration) and GPTQ
  calibrated on the model's own training prompts and answers, rendered as the device renders them;
- keep-base: `model build --keep-base`, the GGUF base's blocks exact and the LoRA's change beside them in fp32.
Each is scored by perplexity (the manifest's text) and field accuracy on same-family and leave-family-out
invoices, schema enforced.

    .venv/bin/python scripts/study_quantizers.py --merged .cache/study17/merged-... --train T.jsonl \
        --test S.jsonl --lfo L.jsonl [--calibration 32] [--only rtn,keep-base]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgellm.daemon.engine.chat import ChatMessage  # noqa: E402
from edgellm.daemon.engine.manifest import ModelManifest, describe_files  # noqa: E402
from edgellm.daemon.engine.model import LoadedModel  # noqa: E402
from edgellm.daemon.engine.perplexity import perplexity  # noqa: E402
from edgellm.models.building.build import build_model  # noqa: E402
from edgellm.models.building.graph_edits import output_head_name  # noqa: E402
from edgellm.models.building.options import BuildOptions, eval_text  # noqa: E402
from edgellm.models.building.quantize import QuantSpec  # noqa: E402
from edgellm.models.building.staging import write_manifest  # noqa: E402
from edgellm.models.tuning.evaluate import evaluate_model, load_examples  # noqa: E402
from edgellm.models.tuning.invoices import SCHEMA  # noqa: E402
from edgellm.models.tuning.lora import read_examples  # noqa: E402

METHODS = ("rtn", "hqq", "gptq")


class Calibration:
    """onnxruntime's CalibrationDataReader over whole prompts+answers, each one prefill from an empty cache."""

    def __init__(self, model: LoadedModel, samples: list[list[int]]):
        d = model.decoder
        self.past = {p: np.zeros((1, d.kv_heads, 0, d.head_dim), np.float32) for p in d.past_names}
        self.samples = samples
        self.rewind()

    def feeds(self, ids: list[int]) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                "logit_positions": np.asarray([len(ids) - 1], np.int64), **self.past}

    def rewind(self) -> None:
        self._next = iter(self.samples)

    def get_next(self) -> dict | None:
        ids = next(self._next, None)
        return None if ids is None else self.feeds(ids)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        data = self.get_next()
        if data is None:
            raise StopIteration
        return data


def calibration(fp32: Path, train: Path, n: int) -> Calibration:
    model = LoadedModel.load(fp32)
    samples = [model.encode(model.render_chat([ChatMessage(role="user", content=prompt)]) + completion,
                            add_special_tokens=False)[:512]
               for prompt, completion in read_examples(train)[:n]]
    return Calibration(model, samples)


def quantized(fp32: Path, out: Path, method: str, train: Path, n_calibration: int) -> float:
    """`fp32`'s MatMuls at 4 bits by `method` into `out` (the head at 8 bits by round to nearest); seconds."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = onnx.load(fp32 / "model.onnx")
    head = output_head_name(model)
    weights = {i.name for i in model.graph.initializer}
    body = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and n.name != head]
    start = time.perf_counter()
    common = dict(block_size=32, is_symmetric=False, accuracy_level=4, op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(model, bits=8, nodes_to_exclude=body, **common)
    q.process()
    model = q.model.model
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in body]
    config = {
        "rtn": lambda: DefaultWeightOnlyQuantConfig(bits=4, **common),
        "hqq": lambda: HQQWeightOnlyQuantConfig(block_size=32, bits=4, op_types_to_quantize=("MatMul",)),
        "gptq": lambda: GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration(fp32, train, n_calibration),
                                                  op_types_to_quantize=("MatMul",)),
    }[method]()
    q = MatMulNBitsQuantizer(model, bits=4, nodes_to_exclude=others, algo_config=config, **common)
    q.process()
    seconds = time.perf_counter() - start
    onnx.save(q.model.model, out / "model.onnx", save_as_external_data=True, location="model.onnx.data",
              all_tensors_to_one_file=True)
    manifest = ModelManifest.model_validate_json((out / "manifest.json").read_text())
    manifest.name = f"{manifest.name.removesuffix('-fp32')}-{method}"
    manifest.files = describe_files(out, list(manifest.files))
    write_manifest(out, manifest)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--merged", type=Path, required=True, help="a `lora merge` folder whose base is a GGUF")
    p.add_argument("--train", type=Path, required=True, help="its training data (GPTQ's calibration set)")
    p.add_argument("--test", type=Path, required=True, help="held-out invoices of the training families")
    p.add_argument("--lfo", type=Path, required=True, help="held-out invoices of families it never saw")
    p.add_argument("--work", type=Path, default=ROOT / ".cache/quantizers")
    p.add_argument("--calibration", type=int, default=32, help="training examples GPTQ calibrates on")
    p.add_argument("--only", help="comma-separated builds (default: fp32,rtn,hqq,gptq,keep-base)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    wanted = args.only.split(",") if args.only else ["fp32", *METHODS, "keep-base"]
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32"
    if not (fp32 / "manifest.json").exists():
        build_model(str(args.merged), fp32, BuildOptions(QuantSpec("fp32"), show_progress=False))
    source_ppl = json.loads((fp32 / "manifest.json").read_text())["quality"]["perplexity"]
    splits = {"same_family": load_examples(args.test), "leave_family_out": load_examples(args.lfo)}
    text = eval_text()
    results = {}
    for name in wanted:
        out = args.work / name
        seconds = None
        if name in METHODS and not (out / "manifest.json").exists():
            seconds = quantized(fp32, out, name, args.train, args.calibration)
        elif name == "keep-base" and not (out / "manifest.json").exists():
            start = time.perf_counter()
            build_model(str(args.merged), out, BuildOptions(QuantSpec("int4"), keep_base=True, show_progress=False))
            seconds = time.perf_counter() - start
        ppl = perplexity(LoadedModel.load(out, threads=args.threads), text)[0]
        row = {"ppl": round(ppl, 3), "ppl_ratio_vs_fp32": round(ppl / source_ppl, 4),
               "mb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e6, 1)}
        if seconds is not None:
            row["quantize_s"] = round(seconds, 1)
        for split, examples in splits.items():
            report = evaluate_model(out, examples, SCHEMA, args.threads, 200)
            row[f"{split}_field_accuracy"] = report["field_accuracy"]
            row[f"{split}_json_valid"] = report["json_valid_rate"]
            row[f"{split}_per_field"] = report["per_field"]
        print(name, {k: v for k, v in row.items() if "per_field" not in k}, file=sys.stderr)
        results[name] = row
    fp = results.get("fp32")
    summary = {"merged": args.merged.name, "source_ppl": source_ppl, "calibration_examples": args.calibration,
               "builds": results}
    if fp:
        summary["lfo_points_lost_vs_fp32"] = {
            k: round(100 * (fp["leave_family_out_field_accuracy"] - r["leave_family_out_field_accuracy"]), 1)
            for k, r in results.items() if k != "fp32"}
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
