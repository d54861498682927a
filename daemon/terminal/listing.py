"""Tables for `edgellm models list`, `models show` and `ps`, laid out as `ollama list / show / ps` are."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgellm.daemon.engine.manifest import ModelManifest, load_manifest
from edgellm.daemon.engine.model import MODEL_FILE
from edgellm.daemon.library import Entry, name_of
from edgellm.daemon.serve.runtime import DaemonRecord


def ago(t: float, now: float | None = None) -> str:
    """'4 minutes ago', as ollama prints MODIFIED."""
    seconds = max(0, (now or time.time()) - t)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def megabytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def model_id(manifest: ModelManifest) -> str:
    """The first 12 hex digits of the graph file's SHA-256, as ollama shows a model's digest."""
    entry = manifest.files.get(MODEL_FILE)
    return entry.sha256[:12] if entry else "-"


def kind(manifest: ModelManifest) -> str:
    return "embedding" if manifest.task == "embedding" else "chat"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def print_models(entries: list[Entry]) -> None:
    rows = [["NAME", "ID", "SIZE", "MODIFIED", "KIND", "QUANT", "ARCHITECTURE"]]
    now = time.time()
    for e in entries:
        m = load_manifest(e.folder)
        size = sum(f.size for f in m.files.values())
        rows.append([e.name, model_id(m), megabytes(size), ago((e.folder / "manifest.json").stat().st_mtime, now),
                     kind(m), m.quantization.scheme, m.architecture])
    print(table(rows))


def model_summary(name: str, folder: Path) -> str:
    """`models show NAME`: what a user asks of a model before running it."""
    m = load_manifest(folder)
    q = m.quantization
    fields = [("name", f"{name} ({m.name} {m.version})"), ("kind", kind(m)),
              ("architecture", f"{m.architecture} ({m.model_type})"),
              ("parameters", m.parameter_size or "(not recorded by the build that made this folder)"),
              ("quantization", q.scheme + (f", {q.bits}-bit blocks of {q.block_size}" if q.bits and q.block_size
                                           else "")),
              ("graph", m.graph), ("size", megabytes(sum(f.size for f in m.files.values()))), ("id", model_id(m)),
              ("source", f"{m.source.kind}: {m.source.ref}")]
    if m.generation:
        template = m.generation.chat_template
        fields += [("context length", f"{m.generation.context_length} tokens"),
                   ("chat template", f"yes ({template})" if template else "none")]
    if m.embedding:
        fields += [("dimension", str(m.embedding.dimension)), ("max length", f"{m.embedding.max_length} tokens")]
    if m.quality is not None and hasattr(m.quality, "perplexity"):
        fields.append(("perplexity", f"{m.quality.perplexity:.2f} on {m.quality.eval_text}"))
    lines = ["  Model", *(f"    {label:<16} {value}" for label, value in fields)]
    return "\n".join([*lines, "", "  License", f"    {m.license or '(none recorded in the manifest)'}"])


def print_daemons(records: list[DaemonRecord], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{**r.model_dump(), "rss_bytes": r.rss_bytes()} for r in records]))
        return
    if not records:
        print("no edgellm daemon is running on this machine (edgellm serve, or systemctl start edgellm)")
        return
    rows = [["NAME", "PID", "MEMORY", "LOADED", "EMBEDDING", "SERVES"]]
    now = time.time()
    for r in records:
        serves = ", ".join(s for s in (f"mqtt {r.mqtt.host}:{r.mqtt.port} as {r.mqtt.device_id}" if r.mqtt else "",
                                       r.http_url or "") if s)
        name = name_of(r.model.folder) or r.model.name  # the name it was run by, as ollama shows
        rows.append([name, str(r.pid), megabytes(r.rss_bytes()), ago(r.model.loaded_at, now),
                     r.embedding_model.name if r.embedding_model else "-", serves])
    print(table(rows))
