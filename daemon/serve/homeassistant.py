"""Home Assistant MQTT discovery (opt-in, `homeassistant.enabled`): the device and its sensors appear in Home
Assistant by themselves. Each sensor is a retained config message on
`<discovery_prefix>/sensor/<node_id>/<object_id>/config` (Home Assistant's "MQTT Discovery" and "MQTT Sensor"
docs) reading edgellm's own retained topics: availability from the presence message with a value_template,
model and version from it too, the update state from the update report, queue depth and tokens/s from the
telemetry (retained, so a sensor has its value right after Home Assistant or the daemon restarts)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgellm.daemon import __version__


@dataclass(frozen=True)
class Sensor:
    key: str
    name: str
    topic: str  # which of the device's topics: status, telemetry or update
    template: str
    unit: str | None = None
    numeric: bool = False
    icon: str | None = None


SENSORS = (
    Sensor("model", "Model", "status", "{{ value_json.model.name }}", icon="mdi:brain"),
    Sensor("model_version", "Model version", "status", "{{ value_json.model.version }}", icon="mdi:tag"),
    Sensor("queue_depth", "Queue depth", "telemetry", "{{ value_json.queue_depth }}", numeric=True,
           icon="mdi:tray-full"),
    Sensor("tokens_per_second", "Tokens per second", "telemetry", "{{ value_json.decode_tps }}", unit="tok/s",
           numeric=True, icon="mdi:speedometer"),
    Sensor("requests", "Requests", "telemetry", "{{ value_json.requests_total }}", numeric=True, icon="mdi:counter"),
    Sensor("update_state", "Update", "update", "{{ value_json.state }}", icon="mdi:update"),
)


def node_id(device_id: str) -> str:
    return f"edgellm_{device_id.replace('.', '_').replace('-', '_')}"


def config_topic(prefix: str, device_id: str, sensor: Sensor) -> str:
    return f"{prefix}/sensor/{node_id(device_id)}/{sensor.key}/config"


def discovery_topics(prefix: str, device_id: str) -> list[str]:
    """Every config topic a device may have published: what `fleet forget` clears (an empty retained message
    removes the entity from Home Assistant)."""
    return [config_topic(prefix, device_id, s) for s in SENSORS]


def discovery_messages(prefix: str, device_id: str, topics: dict[str, str], updates: bool) -> dict[str, bytes]:
    """topic -> retained config payload. `topics` maps status, telemetry and update to the device's topics; the
    update sensor exists only where the update agent runs (its report is retained only there)."""
    node = node_id(device_id)
    device = {"identifiers": [node], "name": f"edgellm {device_id}", "manufacturer": "edgellm",
              "model": "edgellm daemon", "sw_version": __version__}
    # 'lost' (the Last Will after a crash) and 'stopping' are unavailable too, not unknown
    availability = [{"topic": topics["status"],
                     "value_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
                     "payload_available": "online", "payload_not_available": "offline"}]
    out = {}
    for s in SENSORS:
        if s.topic == "update" and not updates:
            continue
        config = {"name": s.name, "unique_id": f"{node}_{s.key}", "object_id": f"{node}_{s.key}",
                  "state_topic": topics[s.topic], "value_template": s.template, "availability": availability,
                  "device": device, "origin": {"name": "edgellm", "sw_version": __version__}}
        if s.unit:
            config["unit_of_measurement"] = s.unit
        if s.numeric:
            config["state_class"] = "measurement"
        if s.icon:
            config["icon"] = s.icon
        out[config_topic(prefix, device_id, s)] = json.dumps(config).encode()
    return out
