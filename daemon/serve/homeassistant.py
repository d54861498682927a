"""Home Assistant MQTT discovery (opt-in, `homeassistant.enabled`): the device and its sensors appear in Home
Assistant by themselves. Each sensor is a retained config message on
`<discovery_prefix>/sensor/<node_id>/<object_id>/config` (Home Assistant's "MQTT Discovery" and "MQTT Sensor"
docs) reading edgellm's own retained topics: availability from the presence message with a value_template,
model and version from it too, the update state from the update report, queue depth and tokens/s from the
telemetry (retained, so a sensor has its value right after Home Assistant or the daemon restarts). Counters are
total_increasing, levels measurement; what describes the device rather than its work is a diagnostic entity.
One button, "Reload model", publishes to the device's command topic (`<root>/<device>/command/reload`): the
daemon re-reads its configuration and loads the model again from disk, as on SIGHUP."""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgellm.daemon import __version__
from edgellm.daemon.update.states import UpdateState


@dataclass(frozen=True)
class Sensor:
    key: str
    name: str
    topic: str  # which of the device's topics: status, telemetry or update
    template: str
    unit: str | None = None
    state_class: str | None = None  # measurement (a level) or total_increasing (a counter that only grows)
    icon: str | None = None
    diagnostic: bool = False  # entity_category: diagnostic (about the device, not what it measures)
    device_class: str | None = None
    options: tuple[str, ...] = ()  # an enum sensor's values


SENSORS = (
    Sensor("model", "Model", "status", "{{ value_json.model.name }}", icon="mdi:brain", diagnostic=True),
    Sensor("model_version", "Model version", "status", "{{ value_json.model.version }}", icon="mdi:tag",
           diagnostic=True),
    Sensor("queue_depth", "Queue depth", "telemetry", "{{ value_json.queue_depth }}", state_class="measurement",
           icon="mdi:tray-full"),
    Sensor("tokens_per_second", "Tokens per second", "telemetry", "{{ value_json.decode_tps }}", unit="tok/s",
           state_class="measurement", icon="mdi:speedometer"),
    Sensor("requests", "Requests", "telemetry", "{{ value_json.requests_total }}", state_class="total_increasing",
           icon="mdi:counter"),
    Sensor("errors", "Errors", "telemetry", "{{ value_json.errors_total }}", state_class="total_increasing",
           icon="mdi:alert-circle-outline"),
    Sensor("memory", "Memory", "telemetry", "{{ value_json.rss_mb }}", unit="MB", state_class="measurement",
           icon="mdi:memory", diagnostic=True, device_class="data_size"),
    Sensor("cpu_temperature", "CPU temperature", "telemetry",
           "{{ value_json.cpu_temp_c if value_json.cpu_temp_c is not none else 'unknown' }}", unit="°C",
           state_class="measurement", diagnostic=True, device_class="temperature"),
    Sensor("update_state", "Update", "update", "{{ value_json.state }}", icon="mdi:update", device_class="enum",
           options=tuple(UpdateState)),
)


RELOAD = "reload"  # the button's key, and the command it sends


def node_id(device_id: str) -> str:
    return f"edgellm_{device_id.replace('.', '_').replace('-', '_')}"


def config_topic(prefix: str, device_id: str, sensor: Sensor) -> str:
    return f"{prefix}/sensor/{node_id(device_id)}/{sensor.key}/config"


def button_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/button/{node_id(device_id)}/{RELOAD}/config"


def discovery_topics(prefix: str, device_id: str) -> list[str]:
    """Every config topic a device may have published: what `fleet forget` clears (an empty retained message
    removes the entity from Home Assistant)."""
    return [*(config_topic(prefix, device_id, s) for s in SENSORS), button_topic(prefix, device_id)]


def discovery_messages(prefix: str, device_id: str, topics: dict[str, str], updates: bool) -> dict[str, bytes]:
    """topic -> retained config payload. `topics` maps status, telemetry, update and reload to the device's
    topics; the update sensor exists only where the update agent runs (its report is retained only there)."""
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
        optional = {"unit_of_measurement": s.unit, "state_class": s.state_class, "icon": s.icon,
                    "entity_category": "diagnostic" if s.diagnostic else None, "device_class": s.device_class,
                    "options": list(s.options) or None}
        config.update((k, v) for k, v in optional.items() if v is not None)
        out[config_topic(prefix, device_id, s)] = json.dumps(config).encode()
    button = {"name": "Reload model", "unique_id": f"{node}_{RELOAD}", "object_id": f"{node}_{RELOAD}",
              "command_topic": topics[RELOAD], "payload_press": RELOAD, "availability": availability,
              "device": device, "origin": {"name": "edgellm", "sw_version": __version__},
              "entity_category": "config", "icon": "mdi:restart", "qos": 1}
    out[button_topic(prefix, device_id)] = json.dumps(button).encode()
    return out
