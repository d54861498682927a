"""The smoke test a device runs on a new model before it may serve it: it loads (every file matching its
digest), answers the golden prompts as the host did, and keeps its perplexity within the signed bound.

The update agent runs it in a child process (`python -m edgellm.daemon.update.smoke SLOT`), so a model that crashes
onnxruntime or eats memory takes down the child, not the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jsonschema

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.update.bundle import BUNDLE_FILE, BundleManifest, GoldenPrompt


def golden_problem(generator, golden: GoldenPrompt, index: int) -> str | None:
    """Why this answer fails its golden prompt, or None. Greedy decoding of a solo sequence (computed as alone,
    even on a serving Generator whose scheduler batches others) makes the expectation exact."""
    from edgellm.daemon.engine.params import GenerationParams

    params = GenerationParams(max_tokens=golden.max_tokens, temperature=0, json_schema=golden.json_schema)
    try:
        result = generator.generate(generator.prompt_ids(golden.prompt, raw=golden.raw), params, solo=True)
    except EdgeError as e:
        return f"golden prompt {index}: {e.message}"
    if golden.json_schema is not None:
        try:
            jsonschema.validate(result.json, golden.json_schema)
        except jsonschema.ValidationError as e:
            return f"golden prompt {index}: output does not match its schema: {e.message}"
    if golden.expected is not None and result.text != golden.expected:
        return f"golden prompt {index}: expected {golden.expected!r}, got {result.text!r}"
    return None


def smoke_test(folder: Path, threads: int = 1) -> dict:
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.perplexity import perplexity

    folder = Path(folder)
    bundle = BundleManifest.model_validate_json((folder / BUNDLE_FILE).read_bytes())
    try:
        model = LoadedModel.load(folder, threads=threads, verify_hashes=True)
    except EdgeError as e:
        return {"ok": False, "problems": [f"load: {e.message}"]}
    generator = Generator(model)
    problems = [p for i, g in enumerate(bundle.smoke.golden, 1) if (p := golden_problem(generator, g, i))]
    report: dict = {}
    smoke = bundle.smoke
    if smoke.eval_file and smoke.max_perplexity:
        ppl, tokens = perplexity(model, (folder / smoke.eval_file).read_text())
        report.update(perplexity=round(ppl, 4), max_perplexity=smoke.max_perplexity, eval_tokens=tokens)
        if ppl > smoke.max_perplexity:
            problems.append(f"perplexity {ppl:.3f} is above the bound {smoke.max_perplexity} in the manifest")
    return {"ok": not problems, "problems": problems, "golden": len(bundle.smoke.golden), **report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.daemon.update.smoke", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    report = smoke_test(args.folder, args.threads)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
