"""The models the benchmarks measure: built once into .cache/bench, and again whenever the toolchain in
models/ has changed since, so a benchmark never quietly measures a build made by older code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stale(folder: Path) -> bool:
    """Missing, or older than the newest file of the toolchain that built it."""
    manifest = folder / "manifest.json"
    toolchain = max(f.stat().st_mtime for f in (ROOT / "models").glob("*.py"))
    return not manifest.exists() or manifest.stat().st_mtime < toolchain


def cached_build(out: Path, source: str, *flags: str) -> Path:
    """`edgellm model build SOURCE --out OUT FLAGS`, unless OUT is an up-to-date build already."""
    if stale(out):
        subprocess.run([sys.executable, "-m", "edgellm.daemon.cli", "model", "build", source, "--out", str(out), *flags,
                        "--force"], cwd=ROOT, check=True)
    return out
