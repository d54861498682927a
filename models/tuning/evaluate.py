"""`edgellm eval`: field-level accuracy of invoice extraction, per language and per field, with JSON validity
and latency, for one or more built models; a JSON report and a PNG plot that compares them."""

from __future__ import annotations

import json
import statistics
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

from edgellm.models.tuning.invoices import FIELDS, INSTRUCTION


def normalise(field: str, value: Any) -> Any:
    """Exact match after normalisation: case, accents and spacing for text; cents for amounts."""
    if value is None:
        return None
    if field in ("total", "vat"):
        try:
            return round(float(value), 2)
        except (TypeError, ValueError):
            return None
    text = unicodedata.normalize("NFKC", str(value)).casefold()
    return " ".join(text.split())


def score(examples: list[dict], predictions: list[dict | None], schema: dict) -> dict:
    """examples: {"gold", "lang", "family"}; predictions: the parsed JSON, or None where the output was not
    valid JSON. Accuracy overall, per field, and per language and layout family."""
    per_field = {f: [] for f in FIELDS}
    groups: dict[str, dict[str, dict[str, list]]] = {"per_language": {}, "per_family": {}}
    valid = []
    for ex, pred in zip(examples, predictions, strict=True):
        ok = pred is not None
        if ok:
            try:
                jsonschema.validate(pred, schema)
            except jsonschema.ValidationError:
                ok = False
        valid.append(ok)
        hits = [ok and normalise(f, pred.get(f)) == normalise(f, ex["gold"][f]) for f in FIELDS]
        for f, hit in zip(FIELDS, hits, strict=True):
            per_field[f].append(hit)
        for group, key in (("per_language", ex.get("lang", "unknown")), ("per_family", ex.get("family", "classic"))):
            entry = groups[group].setdefault(key, {"fields": [], "valid": []})
            entry["valid"].append(ok)
            entry["fields"] += hits
    everything = [h for hits in per_field.values() for h in hits]
    return {
        "n": len(examples),
        "field_accuracy": _mean(everything),
        "json_valid_rate": _mean(valid),
        "per_field": {f: _mean(h) for f, h in per_field.items()},
        **{group: {key: {"n": len(v["valid"]), "field_accuracy": _mean(v["fields"]),
                         "json_valid_rate": _mean(v["valid"])} for key, v in sorted(entries.items())}
           for group, entries in groups.items()},
    }


def _mean(values: list[bool]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def load_examples(path: Path) -> list[dict]:
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or not isinstance(row.get("gold"), dict):
            raise ValueError(f"{path}:{n}: each line needs 'text' (a string) and 'gold' (an object)")
        examples.append(row)
    return examples


def extract(generator, examples: list[dict], schema: dict, max_tokens: int,
            done: Callable[[int], None] | None = None) -> list[tuple[dict | None, float]]:
    """(prediction, latency ms) per example, greedy and constrained to the schema; None where the model could
    not complete valid JSON within max_tokens (counted as invalid)."""
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.errors import EdgeError

    params = GenerationParams(temperature=0, max_tokens=max_tokens, json_schema=schema)
    out = []
    for ex in examples:
        ids = generator.prompt_ids(f"{INSTRUCTION}\n\n{ex['text']}")
        start = time.perf_counter()
        try:
            prediction = generator.generate(ids, params).json
        except EdgeError:
            prediction = None
        out.append((prediction, (time.perf_counter() - start) * 1000))
        if done:
            done(1)
    return out


def report_for(model_name: str, examples: list[dict], results: list[tuple[dict | None, float]], schema: dict) -> dict:
    report = score(examples, [p for p, _ in results], schema)
    report["model"] = model_name
    report["latency_ms_p50"] = round(statistics.median(ms for _, ms in results), 1) if results else None
    return report


def evaluate_model(model_dir: Path, examples: list[dict], schema: dict, threads: int = 0,
                   max_tokens: int = 200, show_progress: bool = False) -> dict:
    """Run the model on every example through the real engine, constrained to the schema."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.models.progress import counting

    generator = Generator(LoadedModel.load(model_dir, threads=threads))
    name = generator.model.manifest.name
    with counting(f"Evaluating {name}", len(examples), enabled=show_progress) as done:
        results = extract(generator, examples, schema, max_tokens, done)
    return report_for(name, examples, results, schema)


def plot(reports: list[dict], path: Path) -> None:
    """Field accuracy per language for each model, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted({lang for r in reports for lang in r["per_language"]})
    groups = ["all", *langs]
    width = 0.8 / max(1, len(reports))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(reports):
        values = [r["field_accuracy"], *[r["per_language"].get(lang, {}).get("field_accuracy", 0) for lang in langs]]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=r["model"])
    ax.set_xticks([g + width * (len(reports) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("field accuracy")
    ax.set_title("Invoice extraction, constrained JSON")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
