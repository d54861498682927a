"""The [update] section of the daemon's configuration: the update room owns it, and
edgellm/daemon/serve/settings.py composes it with the other sections (so loading settings never loads the agent)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from edgellm.daemon.formats import StrictModel


class UpdateSettings(StrictModel):
    """The [update] section of the daemon's configuration (edgellm/daemon/serve/settings.py)."""
    enabled: bool = Field(False, description="follow the desired state published for our groups and device")
    state_dir: Path | None = Field(None, description="model slots and downloads (default: STATE_DIR/updates)")
    public_keys: list[Path] = Field(default_factory=list, description="Ed25519 public keys (PEM) bundles must be "
                                    "signed with; from `edgellm keygen`")
    max_bytes_per_second: int | None = Field(None, gt=0, description="download bandwidth cap")
    retries: int = Field(5, ge=0, description="attempts per file beyond the first")
    retry_backoff: float = Field(1.0, gt=0, description="seconds before the first retry; doubles per attempt")
    timeout: float = Field(30.0, gt=0, description="seconds a download may stall")
    smoke_timeout: float = Field(600.0, gt=0, description="seconds the new model's smoke test may take")
    grace_seconds: float = Field(30.0, ge=0, description="after a switch, a crash or health failure within this "
                                 "window rolls back")
