"""Output folders that appear whole or not at all: built beside the target, renamed into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgellm.daemon.engine.manifest import MANIFEST_NAME, ModelManifest
from edgellm.models.errors import BuildError

OWNER = "owner.pid"


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise BuildError(f"--out: {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)


def remove_abandoned(out: Path) -> None:
    """Staging folders of builds that were killed (SIGKILL, the OOM killer) before they could clean up."""
    for work in out.parent.glob(f".{out.name}.building-*"):
        try:
            os.kill(int((work / OWNER).read_text()), 0)
            continue  # its build is still running
        except PermissionError:
            continue  # running, as another user
        except (OSError, ValueError):  # no such process, or no pid written
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def staged_folder(out: Path) -> Iterator[tuple[Path, Path]]:
    """Yield (staged, scratch) beside `out`. On success `staged` replaces `out` in one rename; either way
    both vanish, and an existing `out` is swapped out only once the new folder is complete. A build killed
    here leaves its folder with the pid it ran as, which the next build removes (remove_abandoned)."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    (work / OWNER).write_text(str(os.getpid()))
    try:
        staged, scratch = work / "model", work / "scratch"
        staged.mkdir()
        scratch.mkdir()
        yield staged, scratch
        readable(staged)
        fsync_tree(staged)
        if out.exists():
            os.rename(out, work / "replaced")
        os.rename(staged, out)
        fsync_tree(out.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def readable(folder: Path) -> None:
    """Files 0644, the folder 0755: a model built by one user is loaded by the service's own (the quantizer's
    temporary files are 0600)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder: Path, manifest: ModelManifest) -> None:
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")


def package_versions(*packages: str) -> dict[str, str]:
    found = {}
    for p in ("edgellm", *packages):
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            found[p] = "unknown"
    return found
