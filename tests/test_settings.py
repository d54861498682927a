"""Configuration sources and secrets, and the device side's independence from the host toolchain."""

from __future__ import annotations

import pytest

from edgellm.daemon.errors import CommandError
from edgellm.daemon.serve.settings import load_settings


def test_precedence_is_flags_then_environment_then_file(tmp_path, monkeypatch):
    config = tmp_path / "edgellm.toml"
    config.write_text("device_id = 'from-file'\ngroups = ['line1']\n[mqtt]\nhost = 'file-host'\nport = 1999\n")
    monkeypatch.setenv("EDGELLM_MQTT__PORT", "1884")
    s = load_settings(config, {"mqtt": {"host": "flag-host"}})
    assert (s.device_id, s.groups, s.mqtt.host, s.mqtt.port) == ("from-file", ["line1"], "flag-host", 1884)


def test_errors_name_the_key_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_LIMITS__QUEUE_SIZE", "0")
    with pytest.raises(CommandError, match=r"limits.queue_size .*EDGELLM_LIMITS__QUEUE_SIZE.*greater than"):
        load_settings()
    monkeypatch.delenv("EDGELLM_LIMITS__QUEUE_SIZE")
    with pytest.raises(CommandError, match="--config: .* does not exist"):
        load_settings(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("device_id = \n")
    with pytest.raises(CommandError, match="not valid TOML"):
        load_settings(tmp_path / "bad.toml")
    with pytest.raises(CommandError, match="topic_root"):
        load_settings(None, {"topic_root": "edgellm/#"})


def test_secrets_come_from_files_and_systemd_credentials(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("from-file\n")
    assert load_settings(None, {"mqtt": {"password_file": str(tmp_path / "pw")}}).mqtt_password() == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential")
    (creds / "mqtt-tls-key").write_text("KEY")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings()
    assert s.mqtt_password() == "from-credential" and s.tls_key_file() == creds / "mqtt-tls-key"
    assert "from-credential" not in repr(load_settings(None, {"mqtt": {"password": "from-credential"}}))
