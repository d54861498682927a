"""What a running daemon serves, written where the CLI looks: `edgellm ps` lists it, `edgellm run` talks to it
instead of loading the model a second time, `edgellm models rm` refuses to pull a model from under it.

One JSON file per daemon process, `daemon-PID.json`, in the runtime folder: $EDGELLM_HOME/run when
EDGELLM_HOME is set (daemons and CLIs sharing a library see each other), /run/edgellm for root (the service),
else $XDG_RUNTIME_DIR/edgellm. The CLI also reads /run/edgellm, so a user sees the system service. The file
holds no secret (the HTTP key and the broker password stay in the config); a file whose process is gone is
ignored and removed by the next daemon that starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

SYSTEM_RUNTIME = Path("/run/edgellm")


class ServedModelRecord(BaseModel):
    name: str  # the manifest's name
    version: str
    folder: str  # resolved: what a library name or a path pointed at when it was loaded
    loaded_at: float


class MqttRecord(BaseModel):
    host: str
    port: int
    topic_root: str
    device_id: str


class DaemonRecord(BaseModel):
    pid: int
    started_at: float
    model: ServedModelRecord
    embedding_model: ServedModelRecord | None = None
    http_url: str | None = None  # e.g. http://127.0.0.1:8080
    http_key_required: bool = False
    mqtt: MqttRecord | None = None

    def rss_bytes(self) -> int | None:
        """The process's resident memory now (Linux /proc), or None once it is gone."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def serves(self, folder: Path) -> bool:
        return Path(self.model.folder).resolve() == folder.resolve() or (
            self.embedding_model is not None and Path(self.embedding_model.folder).resolve() == folder.resolve())


def runtime_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("EDGELLM_HOME"):
        return Path(env["EDGELLM_HOME"]) / "run"
    if env.get("RUNTIME_DIRECTORY"):  # systemd's RuntimeDirectory=
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "edgellm"
    return Path(env.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "edgellm/run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (the service, seen by a user): alive
        return True
    return True


def running_daemons() -> list[DaemonRecord]:
    """The daemons running now, from this user's runtime folder and the system service's."""
    found: dict[int, DaemonRecord] = {}
    for folder in dict.fromkeys([runtime_dir(), SYSTEM_RUNTIME]):
        for path in sorted(folder.glob("daemon-*.json")) if folder.is_dir() else []:
            try:
                record = DaemonRecord.model_validate_json(path.read_text())
            except (OSError, ValueError):
                continue
            if _alive(record.pid):
                found.setdefault(record.pid, record)
    return sorted(found.values(), key=lambda r: r.started_at)


class RuntimeFile:
    """The daemon's own record: written when it serves, rewritten when its model changes, removed at exit."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or runtime_dir()
        self.path = self.folder / f"daemon-{os.getpid()}.json"
        self.started_at = time.time()

    def write(self, record: DaemonRecord) -> None:
        """Best effort: a daemon that cannot write its record still serves (ps and run just do not see it)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob("daemon-*.json"):
                pid = stale.stem.removeprefix("daemon-")
                if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                    stale.unlink(missing_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(record.model_dump_json())
            tmp.chmod(0o644)
            tmp.replace(self.path)
        except OSError:
            pass

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
