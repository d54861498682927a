"""The update agent's state directory: model slots, the active pointer, downloaded chunks, the last report.

    state_dir/active.json      {"active", "previous", "trial"}: replaced by an fsynced rename, never edited
    state_dir/report.json      the last update report (what the broker also holds, retained)
    state_dir/slots/NAME-VERSION/   an assembled, verified model folder with its bundle.json and signature
    state_dir/downloads/SHA256[.part]   fetched chunks, and the one being fetched

A slot appears under its final name only once every file matches its sha256, so whatever a kill -9
interrupts, the active pointer always names a complete model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from edgellm.daemon.engine.manifest import sha256_file
from edgellm.daemon.update.bundle import BUNDLE_FILE, SIGNATURE_FILE, BundleManifest, Piece
from edgellm.daemon.update.states import UpdateReport

STAGING_PREFIX = ".assembling-"


@dataclass
class ActiveState:
    active: str | None = None
    previous: str | None = None
    trial: dict | None = None  # set from the switch until the grace period passes: a restart then rolls back


def slot_name(manifest: BundleManifest) -> str:
    return f"{manifest.name}-{manifest.version}"


def write_atomic(path: Path, data: bytes) -> None:
    """Readers (the daemon after a crash, web servers, devices) see the old file or the whole new one, never a
    part: a unique temporary file beside it, fsynced, renamed over it, and the rename fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SlotStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.slots = self.root / "slots"
        self.downloads = self.root / "downloads"
        for folder in (self.root, self.slots, self.downloads):
            folder.mkdir(parents=True, exist_ok=True)

    # -- pointers -------------------------------------------------------------------------------------
    def state(self) -> ActiveState:
        path = self.root / "active.json"
        return ActiveState(**json.loads(path.read_text())) if path.is_file() else ActiveState()

    def set_state(self, state: ActiveState) -> None:
        write_atomic(self.root / "active.json", json.dumps(asdict(state)).encode())

    def path(self, slot: str | None) -> Path | None:
        return self.slots / slot if slot and (self.slots / slot / BUNDLE_FILE).is_file() else None

    def bundle(self, slot: str | None) -> BundleManifest | None:
        path = self.path(slot)
        return BundleManifest.model_validate_json((path / BUNDLE_FILE).read_bytes()) if path else None

    def last_report(self) -> UpdateReport | None:
        """The last update's report, or None (none yet, or unreadable: the next update starts a new one)."""
        path = self.root / "report.json"
        try:
            return UpdateReport.model_validate_json(path.read_bytes()) if path.is_file() else None
        except (OSError, ValidationError):
            return None

    def save_report(self, report: UpdateReport) -> None:
        write_atomic(self.root / "report.json", report.model_dump_json().encode())

    # -- chunks ---------------------------------------------------------------------------------------
    def local_chunks(self) -> dict[str, tuple[Path, int]]:
        """Chunks this device already holds inside its slots: sha256 -> (file, offset)."""
        found: dict[str, tuple[Path, int]] = {}
        state = self.state()
        for slot in (state.previous, state.active):
            bundle = self.bundle(slot)
            for f in bundle.files if bundle else []:
                offset = 0
                for c in f.chunks:
                    found[c.sha256] = (self.slots / slot / f.path, offset)
                    offset += c.size
        return found

    def missing_chunks(self, manifest: BundleManifest) -> dict[str, int]:
        local = self.local_chunks()
        return {sha: size for sha, size in manifest.unique_chunks().items()
                if sha not in local and not (self.downloads / sha).is_file()}

    def downloaded_bytes(self, manifest: BundleManifest, missing: dict[str, int]) -> int:
        """Bytes of this manifest's chunks already on disk, whole or partial (what a resume starts from),
        given its `missing_chunks`."""
        partial = sum(min((self.downloads / f"{sha}.part").stat().st_size, size) for sha, size in missing.items()
                      if (self.downloads / f"{sha}.part").exists())
        return sum(manifest.unique_chunks().values()) - sum(missing.values()) + partial

    # -- assembly -------------------------------------------------------------------------------------
    def assemble(self, manifest: BundleManifest, manifest_bytes: bytes, signature: bytes,
                 check: Callable[[], None] = lambda: None) -> Path:
        """Write the new slot from local and downloaded chunks, verify every file, then rename it into place."""
        final = self.slots / slot_name(manifest)
        if self.path(final.name):
            return final
        staging = self.slots / f"{STAGING_PREFIX}{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        local = self.local_chunks()
        for f in manifest.files:
            target = staging / f.path
            if not target.resolve().is_relative_to(staging.resolve()):  # BundleFile refuses '..'; a symlink cannot
                shutil.rmtree(staging, ignore_errors=True)
                raise ValueError(f"{f.path}: resolves outside the slot; refusing the bundle")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                for c in f.chunks:
                    check()
                    out.write(self.chunk_bytes(c.sha256, c.size, local))
                out.flush()
                os.fsync(out.fileno())
            if sha256_file(target) != f.sha256:
                shutil.rmtree(staging, ignore_errors=True)
                raise ValueError(f"{f.path}: the assembled file does not match its sha256 in bundle.json")
        (staging / BUNDLE_FILE).write_bytes(manifest_bytes)
        (staging / SIGNATURE_FILE).write_bytes(signature)
        fsync_dir(staging)
        os.replace(staging, final)
        fsync_dir(self.slots)
        return final

    def chunk_bytes(self, sha: str, size: int, local: dict[str, tuple[Path, int]]) -> bytes:
        """A chunk from downloads or from the slot that holds it (`local`: from local_chunks)."""
        downloaded = self.downloads / sha
        if downloaded.is_file():
            return downloaded.read_bytes()
        return self.piece_bytes(Piece(sha256=sha, offset=0, size=size), local)

    @staticmethod
    def piece_bytes(piece: Piece, local: dict[str, tuple[Path, int]]) -> bytes:
        """Bytes inside a chunk a slot holds."""
        path, offset = local[piece.sha256]
        with open(path, "rb") as f:
            f.seek(offset + piece.offset)
            data = f.read(piece.size)
        if len(data) != piece.size:
            raise ValueError(f"chunk {piece.sha256[:12]}… is shorter than {piece.offset + piece.size} bytes")
        return data

    def remove(self, slot: str) -> None:
        shutil.rmtree(self.slots / slot, ignore_errors=True)

    def collect_garbage(self) -> None:
        """Keep the active and previous slots; drop other slots, half-assembled ones and downloaded chunks."""
        state = self.state()
        keep = {state.active, state.previous}
        for folder in self.slots.iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        for chunk in self.downloads.iterdir():
            chunk.unlink(missing_ok=True)
