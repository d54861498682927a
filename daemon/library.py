"""The local model library: built models kept by name under one folder, so `--model smollm2` works as
`ollama run smollm2` does. The folder is $EDGELLM_HOME/models, by default ~/.local/share/edgellm/models for a
user and /var/lib/edgellm/models for root (the service)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgellm.daemon.errors import CommandError, EdgeError

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def library_home(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("EDGELLM_HOME"):
        return Path(env["EDGELLM_HOME"]) / "models"
    if os.geteuid() == 0:
        return Path("/var/lib/edgellm/models")
    return Path(env.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "edgellm/models"


@dataclass(frozen=True)
class Entry:
    name: str
    folder: Path


def is_model_folder(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def resolve_model(ref: str | Path) -> Path:
    """A model folder from a path or a library name; a path that exists wins over a name."""
    path = Path(ref)
    if path.exists() or "/" in str(ref):
        return path
    entry = library_home() / str(ref)
    if is_model_folder(entry):
        return entry
    raise EdgeError("model_unavailable", f"{ref} is neither a model folder nor a model in {library_home()}; "
                    f"`edgellm pull {ref}` fetches or builds it (`edgellm models list` shows what is there)")


def entries() -> list[Entry]:
    home = library_home()
    if not home.is_dir():
        return []
    return [Entry(p.name, p) for p in sorted(home.iterdir()) if p.is_dir() and is_model_folder(p)]


def library_name(source: str) -> str:
    """The name a pulled model gets: a built-in's own, a GGUF's or folder's stem, a hub id's model part."""
    stem = Path(source.rstrip("/")).name
    return (stem.removesuffix(".gguf").split(".")[0] if stem.endswith(".gguf") else stem).lower()


def library_folder(name: str) -> Path:
    """Where a model called `name` lives (it need not exist yet)."""
    if not MODEL_NAME.match(name):
        raise CommandError(f"NAME: {name!r} is not a model name (letters, digits, '.', '_', ':' and '-')")
    return library_home() / name


def library_model(name: str) -> Path:
    """The folder of a model that is in the library, or an error naming the library."""
    folder = library_folder(name)
    if not is_model_folder(folder):
        raise CommandError(f"NAME: no model called {name} in {library_home()}")
    return folder


def name_of(folder: str | Path) -> str | None:
    """The library name of a model folder, or None for a folder outside the library."""
    folder = Path(folder).resolve()
    return folder.name if folder.parent == library_home().resolve() else None


def remove(name: str) -> None:
    shutil.rmtree(library_model(name))


def import_folder(source: Path, name: str | None = None, force: bool = False) -> Path:
    """`edgellm pull FOLDER`: a model folder built elsewhere (`model build --out`), copied into the library
    under `name` (default: the folder's name), its files checked against its manifest first."""
    from edgellm.daemon.engine.manifest import load_manifest

    load_manifest(source, verify_hashes=True)
    folder = library_folder(name or library_name(str(source)))
    if folder.resolve() == source.resolve():
        return folder
    if folder.exists() and not force:
        raise CommandError(f"NAME: {folder.name} is already in the library; pass --force to replace it, or "
                           "--name to keep both")
    staging = folder.with_name(f".{folder.name}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, copy_function=shutil.copy)  # modified: when it came into the library
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)
    return folder
