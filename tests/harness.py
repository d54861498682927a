"""Real processes for the MQTT tests: a mosquitto broker on a free loopback port, edgellm daemons, clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgellm.daemon.serve.client import RpcClient
from edgellm.daemon.serve.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EDGELLM = [sys.executable, "-m", "edgellm.daemon.cli"]  # the CLI of this checkout, in this interpreter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll `condition` until it holds: a test waits for the event it expects, never for a guessed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Broker:
    """mosquitto with our own config. `user root` keeps it from dropping to a user that cannot read tmp files."""

    def __init__(self, folder: Path, conf: str | None = None, port: int | None = None):
        """`conf`, if given, is a whole mosquitto.conf with {port} and {folder} placeholders."""
        self.folder = folder
        self.port = port or free_port()
        self.conf = folder / "mosquitto.conf"
        conf = conf or ("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                        "max_queued_messages 100000\n")
        self.conf.write_text(f"user root\npersistence true\npersistence_location {folder}/\nautosave_interval 1\n"
                             + conf.format(port=self.port, folder=folder))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.folder / "mosquitto.log", "a"))
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Nginx:
    """Debian's nginx serving a folder as static files, as a real bundle store is served (Range requests are
    nginx's own). Runs in the foreground with every path under `folder`; `user root` (as for mosquitto) when
    the tests run as root, so its worker can read pytest's private tmp folders."""

    def __init__(self, folder: Path, root: Path):
        self.folder, self.port = folder, free_port()
        self.conf = folder / "nginx.conf"
        temp = "".join(f"{kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
        self.conf.write_text(("user root;\n" if os.geteuid() == 0 else "") + f"""
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {folder}/access.log;
  {temp}
  server {{ listen 127.0.0.1:{self.port}; root {root}; }}
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nginx:
        binary = next((b for b in ("nginx", "/usr/sbin/nginx") if shutil.which(b)), "nginx")
        self.proc = subprocess.Popen([binary, "-p", str(self.folder), "-c", str(self.conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.folder / "nginx.stderr", "a"))
        wait_for_port(self.port)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> list[str]:
        return (self.folder / "access.log").read_text().splitlines()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def examples(wanted: int) -> int:
    """A fuzz test's examples: as many as it wants in the full suite, at most the loaded hypothesis profile's
    in the quick one (`pytest -m "not slow"` loads the `dev` profile: 200, tests/conftest.py)."""
    from hypothesis import settings as hypothesis_settings

    return min(wanted, hypothesis_settings.default.max_examples)


def settings(port: int, **extra) -> Settings:
    return Settings(mqtt={"host": "127.0.0.1", "port": port, **extra.pop("mqtt", {})}, **extra)


class DaemonProcess:
    """`edgellm serve` in a subprocess, configured through EDGELLM_* variables only."""

    def __init__(self, folder: Path, port: int, model: Path, device: str = "dev1", env: dict | None = None):
        self.folder, self.port, self.device = folder, port, device
        self.env = {**os.environ, "EDGELLM_MQTT__PORT": str(port), "EDGELLM_MQTT__HOST": "127.0.0.1",
                    "EDGELLM_MODEL__PATH": str(model), "EDGELLM_DEVICE_ID": device,
                    "EDGELLM_MODEL__THREADS": "2", "EDGELLM_TELEMETRY_INTERVAL": "1",
                    "EDGELLM_STATE_DIR": str(folder / f"state-{device}"), **(env or {})}
        self.log = folder / f"{device}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> DaemonProcess:
        self.proc = subprocess.Popen([*EDGELLM, "serve"], env=self.env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "a"))
        if wait:
            self.wait_online()
        return self

    def wait_online(self, timeout: float = 60.0) -> dict:
        status = wait_status(self.port, self.device, "online", timeout)
        assert self.proc.poll() is None, self.log.read_text()
        return status

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode if self.proc else None


def wait_status(port: int, device: str, state: str, timeout: float = 30.0, root: str = "edgellm/v1") -> dict:
    """Wait until the retained presence message of `device` says `state`."""
    found: dict = {}
    event = threading.Event()

    def on_message(_c, _u, msg):
        body = json.loads(msg.payload)
        if body.get("state") == state:
            found.update(body)
            event.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(f"{root}/{device}/status", qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not event.wait(timeout):
            raise TimeoutError(f"{device} never reported state {state!r}")
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def rpc(port: int, **kwargs) -> RpcClient:
    return RpcClient(settings(port), **kwargs)


def retained(port: int, topic: str, timeout: float = 10) -> bytes:
    got: list[bytes] = []
    event = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, msg: (got.append(msg.payload), event.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert event.wait(timeout), f"nothing retained on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1]


class UpdateWatch:
    """Follows `{root}/+/update` and keeps every report, so tests can wait on any device's state."""

    def __init__(self, port: int):
        self.reports: dict[str, list[dict]] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe("edgellm/v1/+/update", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c, _u, msg) -> None:
        with self.cond:
            self.reports.setdefault(msg.topic.split("/")[2], []).append(json.loads(msg.payload))
            self.cond.notify_all()

    def wait(self, device: str, desired_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.reports.get(device, []):
                    if r.get("desired_id") == desired_id and r.get("state") in states:
                        return r
                left = deadline - time.monotonic()
                assert left > 0, f"{device} never reached {states} for {desired_id}: {self.reports.get(device)}"
                self.cond.wait(left)

    def states(self, device: str, desired_id: str) -> list[str]:
        with self.cond:
            return [r["state"] for r in self.reports.get(device, []) if r.get("desired_id") == desired_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
