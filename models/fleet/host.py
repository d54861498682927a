"""The host's MQTT side of fleet updates: publish a desired state, watch the fleet, serve a store over HTTP."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from edgellm.daemon.serve.settings import Settings
from edgellm.daemon.update.bundle import DesiredState
from edgellm.models.fleet.rollout import Rollout, RolloutHistory, RolloutPlan, RolloutStatus

log = logging.getLogger("edgellm.fleet")


def publish_desired(settings: Settings, topic: str, desired: DesiredState | None, timeout: float = 10.0) -> None:
    """Publish (or, with None, clear) a retained desired state and wait for the broker's acknowledgement."""
    publish_retained(settings, {topic: desired.model_dump_json().encode() if desired else b""}, timeout)


def publish_retained(settings: Settings, messages: dict[str, bytes], timeout: float = 10.0) -> None:
    """Retained messages (an empty one clears its topic), each acknowledged by the broker."""
    from edgellm.daemon.serve.mqtt_api import connect_client, make_client

    client = make_client(settings, f"edgellm-publish-{int(time.time() * 1000) % 10**8}")
    connect_client(client, settings)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            publish_acked(client, settings, topic, payload, timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def publish_acked(client, settings: Settings, topic: str, payload: bytes, timeout: float = 10.0) -> None:
    """One retained message through a connected client, acknowledged by the broker (or a CommandError)."""
    from edgellm.daemon.errors import CommandError

    info = client.publish(topic, payload, qos=1, retain=True)
    info.wait_for_publish(timeout)
    if not info.is_published():
        raise CommandError(f"the broker at {settings.mqtt.host}:{settings.mqtt.port} did not acknowledge "
                           f"{topic} within {timeout:g} s")


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
    groups: tuple[str, ...] = ()  # from the last online presence (the offline will does not name them)
    last_seen: float = 0.0


class FleetWatch:
    """Retained status and update reports of every device under the topic root, and each group's desired
    state and rollout, kept current."""

    def __init__(self, settings: Settings):
        from edgellm.daemon.serve.mqtt_api import make_client

        self.root = settings.topic_root
        self.settings = settings
        self.devices: dict[str, DeviceRow] = {}
        self.rollouts: dict[str, dict] = {}  # group -> its latest rollout status
        self.desired: dict[str, dict] = {}  # group -> its retained desired state
        self.lock = threading.Lock()
        self._synced = threading.Event()
        self.client = make_client(settings, f"edgellm-fleet-{uuid.uuid4().hex[:12]}")
        self._sync_topic = f"{self.root}/_sync/{uuid.uuid4().hex}"
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{self.root}/+/status", 1),
                                                            (f"{self.root}/+/update", 1),
                                                            (f"{self.root}/groups/+/desired", 1),
                                                            (f"{self.root}/groups/+/rollout", 1),
                                                            (self._sync_topic, 1)])
        self.client.on_message = self._on_message

    def start(self) -> FleetWatch:
        from edgellm.daemon.serve.mqtt_api import connect_client

        connect_client(self.client, self.settings)
        self.client.loop_start()
        return self

    def sync(self, timeout: float = 30.0) -> None:
        """Return once the retained messages present at subscription have arrived: the broker sends them
        right after the subscription, so our own message to a private topic comes back after them."""
        from edgellm.daemon.errors import CommandError

        deadline = time.monotonic() + timeout
        self._synced.clear()
        while not self._synced.is_set():
            if time.monotonic() > deadline:
                raise CommandError(f"the broker at {self.settings.mqtt.host}:{self.settings.mqtt.port} did not "
                                   f"answer within {timeout:g} s")
            self.client.publish(self._sync_topic, b"sync", qos=1)
            self._synced.wait(0.5)

    def publish(self, topic: str, payload: bytes) -> None:
        publish_acked(self.client, self.settings, topic, payload)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c, _u, msg) -> None:
        if msg.topic == self._sync_topic:
            self._synced.set()
            return
        scope, kind = msg.topic[len(self.root) + 1:].rsplit("/", 1)
        try:
            body = json.loads(msg.payload) if msg.payload else None
        except json.JSONDecodeError:
            return
        with self.lock:
            if scope.startswith("groups/"):
                group = scope.removeprefix("groups/")
                table = {"rollout": self.rollouts, "desired": self.desired}.get(kind)
                if table is not None:
                    table.pop(group, None) if body is None else table.__setitem__(group, body)
                return
            if body is None:
                return
            row = self.devices.setdefault(scope, DeviceRow())
            if kind == "status":
                row.presence = body
                row.groups = tuple(body.get("groups") or row.groups)
            else:
                row.update = body
            row.last_seen = max(row.last_seen, float(body.get("ts") or 0))

    def snapshot(self) -> dict[str, DeviceRow]:
        with self.lock:
            return {name: replace(row) for name, row in self.devices.items()}

    def rows(self) -> list[dict]:
        return [describe(name, row) for name, row in sorted(self.snapshot().items())]

    def rollout_rows(self) -> list[dict]:
        with self.lock:
            return [dict(r) for _, r in sorted(self.rollouts.items())]


def run_rollout(settings: Settings, group: str, desired: DesiredState, plan: RolloutPlan, history: RolloutHistory,
                downgrade_key: Path | None = None, poll: float = 1.0,
                on_status: Callable[[RolloutStatus], None] = lambda status: None) -> RolloutStatus:
    """Roll `desired` out to a group by `plan` (edgellm/models/fleet/rollout.py). On abort the group's desired state
    from before the rollout is published again as a new publication; with `downgrade_key` it carries the
    release key's permission, so devices that took the release go back too."""
    from edgellm.models.fleet.bundles import reissue

    root = settings.topic_root
    watch = FleetWatch(settings).start()
    try:
        watch.sync()
        restore = None
        if previous := watch.desired.get(group):
            try:
                restore = reissue(DesiredState.model_validate(previous), downgrade_key)
            except ValidationError as e:
                log.warning("the group's current desired state is not valid (%s); an abort clears it", e)

        def publish_desired(d: DesiredState | None) -> None:
            watch.publish(f"{root}/groups/{group}/desired", d.model_dump_json().encode() if d else b"")

        def publish_status(status: RolloutStatus) -> None:
            watch.publish(f"{root}/groups/{group}/rollout", status.model_dump_json().encode())
            on_status(status)

        return Rollout(group, desired, plan, watch, history, publish_desired, publish_status, restore, poll).run()
    finally:
        watch.stop()


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


def render(rows: list[dict], rollouts: list[dict] = ()):
    """The fleet as a table that fits 80 columns: model and version in one cell, the update cut to fit; the
    groups' rollouts (stage and counts) above it, when there are any."""
    from rich import box
    from rich.console import Group
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
    if not rollouts:
        return table
    plans = Table(title="rollouts", box=box.SIMPLE_HEAD, pad_edge=False, expand=True)
    for column, ratio in (("group", 2), ("release", 3), ("stage", 3), ("ok/bad/wait", 2)):
        plans.add_column(column, no_wrap=True, overflow="ellipsis", ratio=ratio)
    for r in rollouts:
        c = r.get("counts") or {}
        stage = f"{r.get('stage', 0) + 1}/{len(r.get('stages') or [])} {r.get('percent', 0):g}% {r.get('state')}"
        plans.add_row(r.get("group", "?"), f"{r.get('name')} v{r.get('version')}", stage,
                      f"{c.get('succeeded', 0)}/{c.get('failed', 0) + c.get('rolled_back', 0)}/{c.get('pending', 0)}")
    return Group(plans, table)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def serve_store(store: Path, host: str, port: int) -> None:
    """The store as static files over HTTP, with Range support (Starlette's FileResponse), for demos and labs,
    with an access log on stderr. Production fleets put the same folder behind nginx, a CDN or S3."""
    import sys

    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    app = Starlette(routes=[Mount("/", StaticFiles(directory=str(store)))])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("edgellm.store.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    uvicorn.run(AccessLog(app, access), host=host, port=port, log_level="warning")


class AccessLog:
    """One line per request, as nginx writes them: client, request line, status and body bytes sent (what
    `scripts/sim_fleet.py` adds up as the bytes served)."""

    def __init__(self, app, logger: logging.Logger):
        self.app, self.log = app, logger

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = {"status": 0, "bytes": 0}

        async def counting(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            client = (scope.get("client") or ("-",))[0]
            when = time.strftime("%d/%b/%Y:%H:%M:%S %z")
            self.log.info('%s - - [%s] "%s %s HTTP/%s" %d %d', client, when, scope["method"], scope["path"],
                          scope.get("http_version", "1.1"), sent["status"], sent["bytes"])
