"""The host's MQTT side of fleet updates: publish a desired state, watch the fleet, serve a store over HTTP."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.update.bundle import DesiredState


def publish_desired(settings: Settings, topic: str, desired: DesiredState | None, timeout: float = 10.0) -> None:
    """Publish (or, with None, clear) a retained desired state and wait for the broker's acknowledgement."""
    publish_retained(settings, {topic: desired.model_dump_json().encode() if desired else b""}, timeout)


def publish_retained(settings: Settings, messages: dict[str, bytes], timeout: float = 10.0) -> None:
    """Retained messages (an empty one clears its topic), each acknowledged by the broker."""
    from edgellm.daemon.errors import CommandError
    from edgellm.daemon.serve.mqtt_api import connect_client, make_client

    client = make_client(settings, f"edgellm-publish-{int(time.time() * 1000) % 10**8}")
    connect_client(client, settings)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            info = client.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise CommandError(f"the broker at {settings.mqtt.host}:{settings.mqtt.port} did not acknowledge "
                                   f"{topic} within {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()


def forget_device(settings: Settings, device: str) -> None:
    """Clear a retired device's retained presence, telemetry and update report, and its Home Assistant discovery
    configs, so `fleet status` and Home Assistant stop listing it (a device still running publishes them
    again)."""
    from edgellm.daemon.serve.homeassistant import discovery_topics

    root = settings.topic_root
    topics = [f"{root}/{device}/{kind}" for kind in ("status", "telemetry", "update")]
    topics += discovery_topics(settings.homeassistant.discovery_prefix, device)
    publish_retained(settings, dict.fromkeys(topics, b""))


@dataclass
class DeviceRow:
    presence: dict = field(default_factory=dict)
    update: dict = field(default_factory=dict)
    last_seen: float = 0.0


class FleetWatch:
    """Retained status and update reports of every device under the topic root, kept current."""

    def __init__(self, settings: Settings):
        from edgellm.daemon.serve.mqtt_api import make_client

        self.root = settings.topic_root
        self.settings = settings
        self.devices: dict[str, DeviceRow] = {}
        self.lock = threading.Lock()
        self.client = make_client(settings, f"edgellm-fleet-{int(time.time() * 1000) % 10**8}")
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{self.root}/+/status", 1),
                                                            (f"{self.root}/+/update", 1)])
        self.client.on_message = self._on_message

    def start(self) -> FleetWatch:
        from edgellm.daemon.serve.mqtt_api import connect_client

        connect_client(self.client, self.settings)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c, _u, msg) -> None:
        device, kind = msg.topic[len(self.root) + 1:].rsplit("/", 1)
        if device == "groups" or not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except json.JSONDecodeError:
            return
        with self.lock:
            row = self.devices.setdefault(device, DeviceRow())
            setattr(row, "presence" if kind == "status" else "update", body)
            row.last_seen = max(row.last_seen, float(body.get("ts") or 0))

    def rows(self) -> list[dict]:
        with self.lock:
            return [describe(name, row) for name, row in sorted(self.devices.items())]


def describe(name: str, row: DeviceRow) -> dict:
    p, u = row.presence, row.update
    bundle = p.get("bundle") or {}
    model = p.get("model") or {}
    update = u.get("state") or "-"
    if u.get("state") == "DOWNLOADING" and u.get("bytes_total"):
        update += f" {100 * u.get('bytes_done', 0) / u['bytes_total']:.0f}%"
    if u.get("reason") and u.get("state") in ("FAILED", "ROLLED_BACK"):
        update += f": {u['reason']}"
    return {"device": name, "state": p.get("state", "?"), "model": model.get("name", "-"),
            "version": bundle.get("version") or model.get("version", "-"),
            "target": f"{u['name']} {u['version']}" if u.get("name") else "-", "update": update,
            "last_seen": row.last_seen}


def render(rows: list[dict]):
    """The fleet as a table that fits 80 columns: model and version in one cell, the update cut to fit."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"edgellm fleet ({len(rows)} devices)", box=box.SIMPLE_HEAD, pad_edge=False,
                  expand=True)
    for column, ratio in (("device", 2), ("model", 3), ("update", 3)):  # these share what the console has left
        table.add_column(column, no_wrap=True, overflow="ellipsis", ratio=ratio)
    table.add_column("state", width=7, no_wrap=True)
    table.add_column("seen", width=5, no_wrap=True, justify="right")
    now = time.time()
    for r in rows:
        target = f" -> {r['target']}" if r["target"] != "-" and r["update"] not in ("SUCCEEDED", "-") else ""
        table.add_row(r["device"], f"{r['model']} v{r['version']}", r["update"] + target, r["state"],
                      _ago(now - r["last_seen"]) if r["last_seen"] else "-")
    return table


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def serve_store(store: Path, host: str, port: int) -> None:
    """The store as static files over HTTP, with Range support (Starlette's FileResponse), for demos and labs.
    Production fleets put the same folder behind nginx, a CDN or S3."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    app = Starlette(routes=[Mount("/", StaticFiles(directory=str(store)))])
    uvicorn.run(app, host=host, port=port, log_level="warning")
