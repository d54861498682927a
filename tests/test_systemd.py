"""The shipped unit file: systemd-analyze finds nothing to complain about, and the exposure stays low."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edgellm.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def local_copy(tmp_path: Path, edit=lambda text: text) -> Path:
    """verify needs ExecStart's program to exist: point it at this checkout's edgellm."""
    text = UNIT.read_text().replace("/opt/edgellm/.venv/bin/edgellm", str(ROOT / ".venv" / "bin" / "edgellm"))
    path = tmp_path / "edgellm.service"
    path.write_text(edit(text))
    return path


def verify(path: Path) -> str:
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    return (r.stdout + r.stderr).strip()


def test_verify_prints_nothing(tmp_path):
    assert verify(local_copy(tmp_path)) == ""


def test_verify_would_catch_a_typo(tmp_path):
    # systemd-analyze only warns on typos and exits 0: output is the signal.
    assert "notifyy" in verify(local_copy(tmp_path, lambda t: t.replace("Type=notify", "Type=notifyy")))


def test_exposure_is_at_most_2_5(tmp_path):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(local_copy(tmp_path))],
                       capture_output=True, text=True)
    level = float(re.search(r"Overall exposure level for edgellm.service: ([\d.]+)", r.stdout).group(1))
    assert level <= 2.5, r.stdout[-2000:]


def test_the_unit_asks_for_what_the_daemon_provides():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=edgellm",
                 "CacheDirectory=edgellm", "ConfigurationDirectory=edgellm", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "MemoryMax=", "LoadCredential=mqtt-password:"):
        assert line in text
